"""ties, dare_linear, dare_ties and magnitude_prune against plain dense references written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, peft_deltas, run_cli, write_manifest

from lorakit.execute import run_plan
from lorakit.manifest import load_manifest
from lorakit.methods import GroupInput, get_method
from lorakit.methods.base import module_generator
from lorakit.plan import build_plan

ROWS, COLUMNS = 12, 20
PATHS = ("model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj")


def random_group(rank=4, weights=(1.0, 0.6, -0.8), scales=(2.0, 0.5, 1.0), params=None, seed=None, rows=ROWS, columns=COLUMNS, paths=PATHS):
    """A GroupInput of seeded float32 factors, ranks 3, 5 and 4."""
    generator = torch.Generator().manual_seed(11)
    ranks = (3, 5, 4)
    a = [torch.randn((len(paths), r, columns), generator=generator) for r in ranks]
    b = [torch.randn((len(paths), rows, r), generator=generator) for r in ranks]
    return GroupInput(
        module_paths=list(paths), a=a, b=b, scales=list(scales), weights=list(weights), rank=rank, params=params or {}, seed=seed
    )


def source_deltas(group: GroupInput, module: int) -> list[torch.Tensor]:
    """w_i s_i B_i A_i of one module, float64."""
    return [w * s * (b[module].double() @ a[module].double()) for a, b, s, w in zip(group.a, group.b, group.scales, group.weights)]


def reference_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    keep = max(1, round(density * delta.numel()))
    index = delta.abs().flatten().topk(keep).indices
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[index] = True
    return delta * mask.reshape(delta.shape)


def reference_drop(deltas: list[torch.Tensor], density: float, seed: int, path: str) -> list[torch.Tensor]:
    # The documented draw protocol: one float32 uniform matrix per source, in source order, from
    # the module's own generator; an entry survives where u < density.
    generator = module_generator(seed, path)
    dropped = []
    for delta in deltas:
        uniform = torch.rand(delta.shape, generator=generator)
        dropped.append(torch.where(uniform < density, delta, 0.0) / density)
    return dropped


def reference_disjoint_mean(deltas: list[torch.Tensor], sign_method: str) -> torch.Tensor:
    stacked = torch.stack(deltas)
    votes = stacked.sum(0) if sign_method == "total" else stacked.sign().sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    agrees = stacked.sign() == elected
    return (stacked * agrees).sum(0) / agrees.sum(0).clamp(min=1)


def reference_truncation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def reference(method: str, group: GroupInput, module: int) -> torch.Tensor:
    """The merged and truncated delta of one module, by the plain dense formulas."""
    deltas = source_deltas(group, module)
    density = group.params["density"]
    if method == "ties":
        combined = reference_disjoint_mean([reference_trim(d, density) for d in deltas], group.params["majority_sign_method"])
    elif method == "magnitude_prune":
        combined = sum(reference_trim(d, density) for d in deltas)
    elif method == "dare_linear":
        combined = sum(reference_drop(deltas, density, group.seed, group.module_paths[module]))
    else:
        dropped = reference_drop(deltas, density, group.seed, group.module_paths[module])
        combined = reference_disjoint_mean(dropped, group.params["majority_sign_method"])
    return reference_truncation(combined, group.rank)


def merged_delta(result, module: int) -> torch.Tensor:
    return result.scale * (result.b[module].double() @ result.a[module].double())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


CASES = [
    ("ties", {"density": 0.4, "majority_sign_method": "total"}),
    ("ties", {"density": 0.4, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.3}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.5, "majority_sign_method": "total"}),
    ("dare_ties", {"density": 0.7, "majority_sign_method": "frequency"}),
]


@pytest.mark.parametrize("method, params", CASES)
def test_dense_method_matches_reference(method, params):
    group = random_group(params=params, seed=7)
    result = get_method(method).merge(group)

    assert result.a.shape == (2, 4, COLUMNS)
    assert result.b.shape == (2, ROWS, 4)
    assert result.scale == 1.0
    for module in range(2):
        assert relative_error(merged_delta(result, module), reference(method, group, module)) < 1e-5


@pytest.mark.parametrize("method, params", CASES)
def test_dense_method_full_rank_is_untruncated(method, params):
    # K = min(m, n): the truncation keeps everything, so the combined dense delta comes back as is.
    group = random_group(rank=ROWS, params=params, seed=7)
    result = get_method(method).merge(group)

    untruncated = random_group(rank=10**6, params=params, seed=7)
    for module in range(2):
        expected = reference(method, untruncated, module)
        assert relative_error(merged_delta(result, module), expected) < 1e-5
    assert [record["energy_kept"] for record in result.records] == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_density_one_keeps_every_entry(method):
    params = {"density": 1.0, "majority_sign_method": "total"}
    group = random_group(params=params, seed=3)
    result = get_method(method).merge(group)

    for module in range(2):
        deltas = source_deltas(group, module)
        combined = sum(deltas) if method == "dare_linear" else reference_disjoint_mean(deltas, "total")
        assert relative_error(merged_delta(result, module), reference_truncation(combined, 4)) < 1e-5


def test_dare_linear_density_one_equals_svd():
    group = random_group(params={"density": 1.0}, seed=3)
    dare = get_method("dare_linear").merge(group)
    svd = get_method("svd").merge(group)

    for module in range(2):
        assert relative_error(merged_delta(dare, module), merged_delta(svd, module)) < 1e-5


@pytest.mark.parametrize("method, params", CASES)
@pytest.mark.parametrize("factor", [3.0, 0.5])
def test_dense_method_weights_scale_deltas(method, params, factor):
    group = random_group(params=params, seed=5)
    scaled = random_group(weights=[factor * weight for weight in group.weights], params=params, seed=5)
    base = get_method(method).merge(group)
    result = get_method(method).merge(scaled)

    for module in range(2):
        assert relative_error(merged_delta(result, module), factor * merged_delta(base, module)) < 1e-5


def test_ties_votes_with_weighted_signs():
    # One source with weight −1 and one with +1 on the same delta: every entry ties at 0 and
    # elects +1, so only the positively weighted copy survives the disjoint mean.
    group = random_group(weights=(1.0, -1.0, 0.0), scales=(1.0, 1.0, 1.0), params={"density": 1.0, "majority_sign_method": "frequency"})
    group.a[1][:, :3].copy_(group.a[0])
    group.b[1].zero_()
    group.b[1][:, :, :3].copy_(group.b[0])
    result = get_method("ties").merge(group)

    for module in range(2):
        delta = source_deltas(group, module)[0]
        positive = torch.where(delta > 0, delta, 0.0)
        negated = torch.where(delta < 0, -delta, 0.0)
        assert relative_error(merged_delta(result, module), reference_truncation(positive + negated, 4)) < 1e-5


def test_dare_seeds_draw_differently():
    params = {"density": 0.5}
    first = get_method("dare_linear").merge(random_group(params=params, seed=1))
    again = get_method("dare_linear").merge(random_group(params=params, seed=1))
    other = get_method("dare_linear").merge(random_group(params=params, seed=2))

    assert torch.equal(first.a, again.a)
    assert torch.equal(first.b, again.b)
    assert not torch.allclose(merged_delta(first, 0), merged_delta(other, 0))


def test_dare_draws_ignore_batching():
    # Each module draws from its own (seed, path) generator, so splitting a batch changes nothing.
    params = {"density": 0.5, "majority_sign_method": "total"}
    group = random_group(params=params, seed=4)
    second = GroupInput(
        module_paths=PATHS[1:],
        a=[a[1:] for a in group.a],
        b=[b[1:] for b in group.b],
        scales=group.scales,
        weights=group.weights,
        rank=group.rank,
        params=params,
        seed=4,
    )
    together = get_method("dare_ties").merge(group)
    alone = get_method("dare_ties").merge(second)

    assert relative_error(merged_delta(alone, 0), merged_delta(together, 1)) < 1e-6


@pytest.mark.parametrize("method, params", CASES)
def test_randomized_truncation_keeps_near_optimal_energy(method, params):
    # 160 x 120 with K = 8 takes the randomized path (sketch 24 < 120).
    group = random_group(rank=8, params=params, seed=9, rows=160, columns=120, paths=PATHS[:1])
    result = get_method(method).merge(group)
    record = result.records[0]
    assert record["truncation"] == "randomized"

    untruncated = random_group(rank=10**6, params=params, seed=9, rows=160, columns=120, paths=PATHS[:1])
    combined = reference(method, untruncated, 0)
    singular = torch.linalg.svdvals(combined)
    optimal = float(singular[:8].square().sum() / singular.square().sum())
    assert record["energy_kept"] > optimal - 2e-3
    assert record["energy_kept"] <= optimal + 1e-6

    # The recorded share is the one the written factors really keep.
    residual = float((combined - merged_delta(result, 0)).norm().square() / combined.norm().square())
    assert record["energy_kept"] == pytest.approx(1.0 - residual, abs=1e-5)


def test_dense_methods_need_density(tmp_path):
    manifest = tmp_path / "recipe" / "merge.yaml"
    manifest.parent.mkdir()
    manifest.write_text(
        "version: 1\n"
        "sources:\n"
        "  - path: ../a\n"
        "merge:\n"
        "  method: svd\n"
        "  rank: 4\n"
        "  rules:\n"
        "    - match: '*'\n"
        "      method: ties\n"
        "output:\n"
        "  path: ../output\n"
    )
    completed = run_cli("validate", "--no-sources", str(manifest))

    assert completed.returncode == 1
    assert "merge.yaml:9:15: method 'ties' needs 'density'" in completed.stderr


def test_dare_needs_seeds(tmp_path):
    body = {
        "version": 1,
        "sources": [{"path": "../a"}],
        "merge": {"method": "dare_linear", "rank": 4, "density": 0.5},
        "output": {"path": "../output"},
    }
    completed = run_cli("validate", "--no-sources", str(write_manifest(tmp_path / "recipe", body)))

    assert completed.returncode == 1
    assert "'dare_linear', which draws at random; add a top-level 'seeds' list" in completed.stderr


@pytest.fixture(scope="module")
def sources(tmp_path_factory, base_model) -> list[Path]:
    root = tmp_path_factory.mktemp("dense-sources")
    return [
        make_adapter(base_model, root / "a", seed=21, r=4, alpha=8),
        make_adapter(base_model, root / "b", seed=22, r=2, alpha=8),
        make_adapter(base_model, root / "c", seed=23, r=4, alpha=4),
    ]


WEIGHTS = [1.0, 0.7, 1.3]


def dense_manifest(folder: Path, sources: list[Path], merge: dict, seeds: list[int] | None = None) -> Path:
    body = {
        "version": 1,
        "sources": [{"path": str(path), "weight": weight} for path, weight in zip(sources, WEIGHTS)],
        "merge": merge,
        **({"seeds": seeds} if seeds else {}),
        "output": {"path": str(folder.parent / f"{folder.name}-output")},
    }
    return write_manifest(folder, body)


def test_ties_cli_round_trip_through_peft(tmp_path, sources, base_model):
    merge = {"method": "ties", "rank": 5, "density": 0.3, "majority_sign_method": "frequency"}
    completed = run_cli("run", str(dense_manifest(tmp_path / "recipe", sources, merge)), "--device", "cpu", "--no-progress")
    assert completed.returncode == 0, completed.stderr
    output = Path(completed.stdout.strip())

    merged = peft_deltas(base_model, output)
    deltas = [peft_deltas(base_model, path) for path in sources]
    assert len(merged) == 10
    for path, delta in merged.items():
        trimmed = [reference_trim(weight * source[path].double(), 0.3) for weight, source in zip(WEIGHTS, deltas)]
        expected = reference_truncation(reference_disjoint_mean(trimmed, "frequency"), 5)
        assert relative_error(delta.double(), expected) < 1e-5, path

    provenance = json.loads((output / "provenance.json").read_text())
    for group in provenance["groups"]:
        assert set(group["records"]) == set(group["modules"])
        assert all(0.0 < record["energy_kept"] <= 1.0 for record in group["records"].values())
        # k_proj and v_proj (16 x 32) are no larger than the sketch (21 columns for K = 5), so they
        # get the exact SVD; the larger projections get the randomized one.
        expected_solver = "exact" if group["projection"] in ("k_proj", "v_proj") else "randomized"
        assert {record["truncation"] for record in group["records"].values()} == {expected_solver}


def test_dare_same_seed_gives_identical_files(tmp_path, sources):
    merge = {"method": "dare_ties", "rank": 5, "density": 0.5}
    first = run_plan(build_plan(load_manifest(dense_manifest(tmp_path / "one", sources, merge, [3, 4])), device="cpu"), progress=False)
    second = run_plan(build_plan(load_manifest(dense_manifest(tmp_path / "two", sources, merge, [3, 4])), device="cpu"), progress=False)

    assert [result.seed for result in first] == [3, 4]
    for one, two in zip(first, second):
        assert one.path.name == f"seed-{one.seed}"
        assert (one.path / "adapter_model.safetensors").read_bytes() == (two.path / "adapter_model.safetensors").read_bytes()
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert one.files[name] == two.files[name]
    assert first[0].files["adapter_model.safetensors"] != first[1].files["adapter_model.safetensors"]


def test_dare_linear_round_trip_matches_reference(tmp_path, sources, base_model):
    merge = {"method": "dare_linear", "rank": 5, "density": 0.6}
    output = run_plan(build_plan(load_manifest(dense_manifest(tmp_path / "recipe", sources, merge, [8])), device="cpu"), progress=False)[0].path

    merged = peft_deltas(base_model, output)
    deltas = [peft_deltas(base_model, path) for path in sources]
    for path, delta in merged.items():
        weighted = [weight * source[path].double() for weight, source in zip(WEIGHTS, deltas)]
        expected = reference_truncation(sum(reference_drop(weighted, 0.6, 8, path)), 5)
        assert relative_error(delta.double(), expected) < 1e-5, path


def test_dense_batches_fit_budget(tmp_path, sources):
    merge = {"method": "magnitude_prune", "rank": 4, "density": 0.5}
    plan = build_plan(load_manifest(dense_manifest(tmp_path / "recipe", sources, merge)), device="cpu", batch_bytes=40_000)
    group = next(group for group in plan.groups if group.projection == "up_proj")

    # up_proj: (48, 32), ranks 4/2/4. Factors 4·10·80 = 3200 bytes and 5 dense buffers of
    # 4·48·32 bytes per module: 33920 bytes, so one module per batch.
    assert group.dense_bytes() == 5 * 4 * 48 * 32
    assert group.layer_batches(plan.batch_bytes) == [(0, 1), (1, 2)]
    assert plan.peak_memory_estimate() >= group.dense_bytes()

    cat = build_plan(load_manifest(dense_manifest(tmp_path / "cat", sources, {"method": "cat"})), device="cpu", batch_bytes=40_000)
    cat_group = next(group for group in cat.groups if group.projection == "up_proj")
    assert cat_group.dense_bytes() == 0
    assert cat_group.layer_batches(cat.batch_bytes) == [(0, 2)]


def test_ties_buffers_grow_with_sources():
    assert get_method("ties").dense_buffers(4) == 8
    assert get_method("dare_ties").dense_buffers(2) == 6
    assert get_method("dare_linear").dense_buffers(4) == 5
    assert get_method("svd").dense_buffers(4) == 0
