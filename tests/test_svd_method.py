"""svd: exact factor-space truncation of Σ w_i ΔW_i, checked against dense float64 references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, peft_deltas, run_cli, saved_tensors, write_manifest

from lorakit.execute import run_plan
from lorakit.manifest import load_manifest
from lorakit.methods import GroupInput, get_method
from lorakit.plan import build_plan

RANKS = (3, 5, 4)


def random_group(ranks=RANKS, rows=12, columns=20, modules=2, scales=(2.0, 0.5, 1.0), weights=(1.0, -0.5, 2.0), rank=None, seed=0):
    """A GroupInput of seeded float32 factors for ``modules`` modules of shape (rows, columns)."""
    generator = torch.Generator().manual_seed(seed)
    a = [torch.randn((modules, r, columns), generator=generator) for r in ranks]
    b = [torch.randn((modules, rows, r), generator=generator) for r in ranks]
    paths = [f"model.layers.{index}.mlp.up_proj" for index in range(modules)]
    return GroupInput(module_paths=paths, a=a, b=b, scales=list(scales), weights=list(weights), rank=rank)


def weighted_sum(group: GroupInput) -> torch.Tensor:
    """Σ w_i s_i B_i @ A_i in float64, (L, m, n)."""
    return sum(w * s * (b.double() @ a.double()) for a, b, s, w in zip(group.a, group.b, group.scales, group.weights))


def dense_truncation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-K approximation of each matrix, by a float64 dense SVD."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]


def merged_delta(result) -> torch.Tensor:
    return result.scale * (result.b.double() @ result.a.double())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def test_svd_full_rank_equals_weighted_sum():
    group = random_group(rank=sum(RANKS))
    result = get_method("svd").merge(group)

    assert result.a.shape == (2, sum(RANKS), 20)
    assert result.b.shape == (2, 12, sum(RANKS))
    assert relative_error(merged_delta(result), weighted_sum(group)) < 1e-5
    assert [record["energy_kept"] for record in result.records] == pytest.approx([1.0, 1.0], abs=1e-12)


def test_svd_truncation_matches_dense_svd():
    group = random_group(rank=5)
    result = get_method("svd").merge(group)
    exact = weighted_sum(group)

    assert result.a.shape == (2, 5, 20)
    assert relative_error(merged_delta(result), dense_truncation(exact, 5)) < 1e-5
    singular = torch.linalg.svdvals(exact)
    expected_energy = (singular[:, :5].square().sum(dim=1) / singular.square().sum(dim=1)).tolist()
    assert [record["energy_kept"] for record in result.records] == pytest.approx(expected_energy, rel=1e-6)


def test_svd_factors_are_balanced():
    # √σ on each side: the k-th column of B and row of A have equal norms, √σ_k · √(1/scale).
    result = get_method("svd").merge(random_group(rank=5, scales=(2.0, 2.0, 2.0)))

    assert result.scale == 2.0
    assert torch.allclose(result.b.norm(dim=1), result.a.norm(dim=2), rtol=1e-4)


@pytest.mark.parametrize("factor", [2.0, -0.5])
def test_svd_weights_scale_deltas(factor):
    group = random_group(rank=5)
    scaled = random_group(rank=5, weights=[factor * weight for weight in group.weights])

    base = merged_delta(get_method("svd").merge(group))
    assert relative_error(merged_delta(get_method("svd").merge(scaled)), factor * base) < 1e-5


def test_svd_opposite_weights_cancel():
    group = random_group(ranks=(4, 4), scales=(1.0, 1.0), weights=(1.0, -1.0), rank=4)
    group.a[1].copy_(group.a[0])
    group.b[1].copy_(group.b[0])
    result = get_method("svd").merge(group)

    assert merged_delta(result).abs().max() < 1e-5


def test_svd_lowers_rank_to_limit():
    method = get_method("svd")

    assert method.rank_limit([16, 16], 4096, 11008) == 32
    assert method.rank_limit([16, 16], 8, 11008) == 8
    assert method.rank_limit([16, 16], 4096, 6) == 6


def test_svd_handles_shapes_too_large_for_dense():
    # A dense (200000, 200000) float32 delta would take 160 GB; the factor-space SVD needs
    # only the factors, so this runs in well under a second.
    group = random_group(ranks=(2, 3), rows=200_000, columns=200_000, modules=1, scales=(1.0, 1.0), weights=(1.0, 1.0), rank=4)
    result = get_method("svd").merge(group)

    assert result.a.shape == (1, 4, 200_000)
    assert result.b.shape == (1, 200_000, 4)
    # The Gram matrices of the factors determine ‖ΣΔ‖_F² = tr((BᵀB)(AAᵀ)) without forming ΣΔ.
    b = torch.cat(group.b, dim=2)[0].double()
    a = torch.cat(group.a, dim=1)[0].double()
    total = torch.trace((b.T @ b) @ (a @ a.T))
    kept = torch.trace((result.b[0].double().T @ result.b[0].double()) @ (result.a[0].double() @ result.a[0].double().T))
    assert float(kept / total) == pytest.approx(result.records[0]["energy_kept"], rel=1e-4)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, base_model) -> list[Path]:
    root = tmp_path_factory.mktemp("svd-sources")
    return [
        make_adapter(base_model, root / "a", seed=1, r=4, alpha=8),
        make_adapter(base_model, root / "b", seed=2, r=4, alpha=16),
        make_adapter(base_model, root / "c", seed=3, r=2, alpha=2),
    ]


WEIGHTS = [1.0, 0.5, -0.7]


def svd_manifest(folder: Path, sources: list[Path], rank: int, name: str = "merge.yaml") -> Path:
    body = {
        "version": 1,
        "sources": [{"path": str(path), "weight": weight} for path, weight in zip(sources, WEIGHTS)],
        "merge": {"method": "svd", "rank": rank},
        "output": {"path": str(folder.parent / f"{folder.name}-output")},
    }
    return write_manifest(folder, body, name)


def test_svd_cli_round_trip_through_peft(tmp_path, sources, base_model):
    manifest = svd_manifest(tmp_path / "recipe", sources, rank=6)
    completed = run_cli("run", str(manifest), "--device", "cpu", "--no-progress")
    assert completed.returncode == 0, completed.stderr
    output = Path(completed.stdout.strip())

    merged = peft_deltas(base_model, output)
    source_deltas = [peft_deltas(base_model, path) for path in sources]
    assert len(merged) == 10
    for path, delta in merged.items():
        exact = sum(weight * deltas[path].double() for weight, deltas in zip(WEIGHTS, source_deltas))
        assert relative_error(delta.double(), dense_truncation(exact, 6)) < 1e-5, path

    config = json.loads((output / "adapter_config.json").read_text())
    assert config["r"] == 6
    assert config["lora_alpha"] == 6
    provenance = json.loads((output / "provenance.json").read_text())
    records = provenance["groups"][0]["records"]
    assert set(records) == set(provenance["groups"][0]["modules"])
    assert all(0.0 < record["energy_kept"] <= 1.0 for record in records.values())


def test_svd_rank_above_sum_reproduces_sum(tmp_path, sources, base_model):
    manifest = svd_manifest(tmp_path / "recipe", sources, rank=64)
    plan = build_plan(load_manifest(manifest), device="cpu")
    assert {group.output_rank for group in plan.groups} == {10}
    assert {group.output_scale for group in plan.groups} == {1.0}

    output = run_plan(plan, progress=False)[0].path
    merged = peft_deltas(base_model, output)
    source_deltas = [peft_deltas(base_model, path) for path in sources]
    for path, delta in merged.items():
        exact = sum(weight * deltas[path].double() for weight, deltas in zip(WEIGHTS, source_deltas))
        assert relative_error(delta.double(), exact) < 1e-5, path
    records = json.loads((output / "provenance.json").read_text())["groups"][0]["records"]
    assert {record["energy_kept"] for record in records.values()} == {1.0}


def test_svd_shared_scale_is_kept(tmp_path, base_model):
    shared = [make_adapter(base_model, tmp_path / name, seed=seed, r=4, alpha=8) for name, seed in (("x", 5), ("y", 6))]
    body = {
        "version": 1,
        "sources": [{"path": str(path)} for path in shared],
        "merge": {"method": "svd", "rank": 3},
        "output": {"path": str(tmp_path / "output")},
    }
    plan = build_plan(load_manifest(write_manifest(tmp_path / "recipe", body)), device="cpu")
    output = run_plan(plan, progress=False)[0].path

    config = json.loads((output / "adapter_config.json").read_text())
    assert config["r"] == 3
    assert config["lora_alpha"] == 6
    tensors = saved_tensors(output)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (3, 32)


def test_svd_output_is_reproducible(tmp_path, sources):
    first = run_plan(build_plan(load_manifest(svd_manifest(tmp_path / "one", sources, rank=5)), device="cpu"), progress=False)
    second = run_plan(build_plan(load_manifest(svd_manifest(tmp_path / "two", sources, rank=5)), device="cpu"), progress=False)

    first_bytes = (first[0].path / "adapter_model.safetensors").read_bytes()
    assert first_bytes == (second[0].path / "adapter_model.safetensors").read_bytes()
