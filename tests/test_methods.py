"""Each built-in method against its formula, compared on deltas computed by PEFT itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TARGETS, make_adapter, peft_deltas, saved_tensors, write_manifest
from lorakit.errors import AdapterError
from lorakit.execute import run_plan
from lorakit.manifest import load_manifest
from lorakit.plan import build_plan
from lorakit.provenance import file_sha256

ATOL = 1e-6


def merge(folder: Path, sources: list[dict], merge_section: dict, **extra) -> Path:
    """Write a manifest in ``folder/recipes`` and run it; return the output folder."""
    body = {"version": 1, "sources": sources, "merge": merge_section, "output": {"path": "../out"}, **extra}
    manifest = write_manifest(folder / "recipes", body)
    run_plan(build_plan(load_manifest(manifest), device="cpu"), progress=False)
    return folder / "out"


def sources_of(folders: list[Path], weights: list[float] | None = None, up: str = "..") -> list[dict]:
    """Source entries for a manifest one folder below ``folders``' parent (``up`` climbs further)."""
    entries = [{"path": f"{up}/{folder.name}"} for folder in folders]
    for entry, weight in zip(entries, weights or []):
        entry["weight"] = weight
    return entries


def assert_deltas_close(actual: dict, expected: dict, atol: float = ATOL) -> None:
    assert sorted(actual) == sorted(expected)
    for path in expected:
        error = (actual[path] - expected[path]).abs().max().item()
        assert error <= atol, f"{path}: max |ΔW - expected| = {error}"


@pytest.fixture()
def four_seeds(base_model, tmp_path) -> list[Path]:
    return [make_adapter(base_model, tmp_path / f"seed{seed}", seed, r=4, alpha=8) for seed in (1, 2, 3, 4)]


def test_block_full_rank_is_mean_delta(base_model, tmp_path, four_seeds):
    output = merge(tmp_path, sources_of(four_seeds), {"method": "block", "rank": 16})
    expected_parts = [peft_deltas(base_model, folder) for folder in four_seeds]
    expected = {path: sum(part[path] for part in expected_parts) / 4 for path in expected_parts[0]}
    assert_deltas_close(peft_deltas(base_model, output), expected)


def test_block_reference_factors(base_model, tmp_path):
    """Four rank-16 sources with alpha 32 and K = 64: A' stacks the A_i, both scaled by √(16/64)."""
    folders = [make_adapter(base_model, tmp_path / f"s{seed}", seed, r=16, alpha=32) for seed in (1, 2, 3, 4)]
    hashes = {folder: file_sha256(folder / "adapter_model.safetensors") for folder in folders}
    output = merge(tmp_path, sources_of(folders), {"method": "block", "rank": 64})

    config = json.loads((output / "adapter_config.json").read_text())
    assert config["r"] == 64
    assert config["lora_alpha"] == 128
    merged = saved_tensors(output)
    inputs = [saved_tensors(folder) for folder in folders]
    for key, value in merged.items():
        stacked = torch.cat([tensors[key] for tensors in inputs], dim=0 if ".lora_A." in key else 1)
        torch.testing.assert_close(value, stacked * math.sqrt(16 / 64), rtol=0, atol=0)
    for folder in folders:
        assert file_sha256(folder / "adapter_model.safetensors") == hashes[folder], "a source was modified"


def test_block_rank_below_source_count(base_model, tmp_path, four_seeds):
    output = merge(tmp_path, sources_of(four_seeds), {"method": "block", "rank": 3})
    parts = [saved_tensors(folder) for folder in four_seeds]
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["r"] == 3
    assert config["lora_alpha"] == 6  # K · alpha / r = 3 · 8 / 4

    # ΔW = (1/K) Σ r_i s_i b_i0 a_i0ᵀ over the first component of sources 1-3.
    scale = 8 / 4
    actual = peft_deltas(base_model, output)
    for path, delta in actual.items():
        key = f"base_model.model.{path}"
        expected = sum(
            4 * scale * torch.outer(part[f"{key}.lora_B.weight"][:, 0], part[f"{key}.lora_A.weight"][0]) for part in parts[:3]
        ) / 3
        assert (delta - expected).abs().max().item() <= ATOL


def test_block_alpha_below_rank_keeps_ratio(base_model, tmp_path):
    folders = [make_adapter(base_model, tmp_path / f"s{seed}", seed, r=8, alpha=4) for seed in (1, 2)]
    output = merge(tmp_path, sources_of(folders), {"method": "block", "rank": 6})
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 3  # 6 · 4 / 8, never integer division to 0
    assert config["r"] == 6


def test_block_weights_scale_particles(base_model, tmp_path, four_seeds):
    weights = [2.0, -1.0, 0.5, 1.0]
    output = merge(tmp_path, sources_of(four_seeds, weights), {"method": "block", "rank": 16})
    parts = [peft_deltas(base_model, folder) for folder in four_seeds]
    expected = {path: sum(w * part[path] for w, part in zip(weights, parts)) / 4 for path in parts[0]}
    assert_deltas_close(peft_deltas(base_model, output), expected)


def test_block_different_ranks_and_scales(base_model, tmp_path):
    folders = [
        make_adapter(base_model, tmp_path / "a", 1, r=4, alpha=8),
        make_adapter(base_model, tmp_path / "b", 2, r=8, alpha=4),
        make_adapter(base_model, tmp_path / "c", 3, r=2, alpha=16, use_rslora=True),
    ]
    output = merge(tmp_path, sources_of(folders), {"method": "block", "rank": 14})
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 14  # scales differ, so the output scale is 1

    # K = Σ r_i takes every component: ΔW = (1/K) Σ r_i ΔW_i.
    parts = [peft_deltas(base_model, folder) for folder in folders]
    expected = {path: sum(r * part[path] for r, part in zip((4, 8, 2), parts)) / 14 for path in parts[0]}
    assert_deltas_close(peft_deltas(base_model, output), expected)


def test_cat_is_weighted_sum(base_model, tmp_path):
    folders = [
        make_adapter(base_model, tmp_path / "a", 1, r=4, alpha=8),
        make_adapter(base_model, tmp_path / "b", 2, r=6, alpha=3),
        make_adapter(base_model, tmp_path / "c", 3, r=2, alpha=4, use_rslora=True),
    ]
    weights = [0.5, -2.0, 1.5]
    output = merge(tmp_path, sources_of(folders, weights), {"method": "cat"})
    parts = [peft_deltas(base_model, folder) for folder in folders]
    expected = {path: sum(w * part[path] for w, part in zip(weights, parts)) for path in parts[0]}
    assert_deltas_close(peft_deltas(base_model, output), expected)
    assert json.loads((output / "adapter_config.json").read_text())["r"] == 12


def test_include_skips_unshared_modules(base_model, tmp_path):
    folders = [
        make_adapter(base_model, tmp_path / "a", 1, targets=["q_proj", "v_proj"]),
        make_adapter(base_model, tmp_path / "b", 2, targets=["q_proj", "up_proj"]),
    ]
    output = merge(tmp_path, sources_of(folders), {"method": "cat", "include": ["q_proj"]})

    parts = [peft_deltas(base_model, folder) for folder in folders]
    expected = {path: parts[0][path] + parts[1][path] for path in parts[0] if path.endswith("q_proj")}
    assert_deltas_close(peft_deltas(base_model, output), expected)


def test_sources_with_other_modules_rejected(base_model, tmp_path):
    folders = [
        make_adapter(base_model, tmp_path / "a", 1, targets=["q_proj", "v_proj"]),
        make_adapter(base_model, tmp_path / "b", 2, targets=["q_proj", "up_proj"]),
    ]
    with pytest.raises(AdapterError) as raised:
        merge(tmp_path, sources_of(folders), {"method": "cat"})

    message = str(raised.value)
    assert "adapts other modules than source 'a' (4 differ" in message
    assert "or leave projection 'v_proj' out with merge.include" in message


def test_cat_single_source_is_identity(base_model, tmp_path):
    folder = make_adapter(base_model, tmp_path / "only", 7, r=4, alpha=16)
    output = merge(tmp_path, sources_of([folder]), {"method": "cat"})
    assert_deltas_close(peft_deltas(base_model, output), peft_deltas(base_model, folder))
    config = json.loads((output / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 16)


def test_soups_averages_factors(base_model, tmp_path, four_seeds):
    weights = [1.0, 2.0, 3.0, 4.0]
    output = merge(tmp_path, sources_of(four_seeds, weights), {"method": "soups"})
    parts = [saved_tensors(folder) for folder in four_seeds]
    total = sum(weights)
    actual = peft_deltas(base_model, output)
    for path, delta in actual.items():
        key = f"base_model.model.{path}"
        a = sum(w * part[f"{key}.lora_A.weight"] for w, part in zip(weights, parts)) / total
        b = sum(w * part[f"{key}.lora_B.weight"] for w, part in zip(weights, parts)) / total
        assert (delta - 2.0 * b @ a).abs().max().item() <= ATOL


def test_soups_folds_different_scales(base_model, tmp_path):
    folders = [
        make_adapter(base_model, tmp_path / "a", 1, r=4, alpha=8),
        make_adapter(base_model, tmp_path / "b", 2, r=4, alpha=2),
    ]
    output = merge(tmp_path, sources_of(folders), {"method": "soups"})
    config = json.loads((output / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 4)  # scale 1
    parts = [saved_tensors(folder) for folder in folders]
    roots = [math.sqrt(2.0), math.sqrt(0.5)]
    for path, delta in peft_deltas(base_model, output).items():
        key = f"base_model.model.{path}"
        a = sum(root * part[f"{key}.lora_A.weight"] for root, part in zip(roots, parts)) / 2
        b = sum(root * part[f"{key}.lora_B.weight"] for root, part in zip(roots, parts)) / 2
        assert (delta - b @ a).abs().max().item() <= ATOL


def test_random_matches_recorded_draws(base_model, tmp_path, four_seeds):
    output = merge(tmp_path, sources_of(four_seeds), {"method": "random", "rank": 8}, seeds=[5])
    record = json.loads((output / "provenance.json").read_text())
    draws = {path: draws["draws"] for group in record["groups"] for path, draws in group["records"].items()}
    parts = [saved_tensors(folder) for folder in four_seeds]
    scale = 2.0
    for path, delta in peft_deltas(base_model, output).items():
        key = f"base_model.model.{path}"
        assert len(draws[path]) == 8
        expected = sum(
            4 * scale * torch.outer(parts[s][f"{key}.lora_B.weight"][:, j], parts[s][f"{key}.lora_A.weight"][j])
            for s, j in draws[path]
        ) / 8
        assert (delta - expected).abs().max().item() <= ATOL


def test_random_same_seed_same_bytes(base_model, tmp_path, four_seeds):
    body = {"version": 1, "sources": sources_of(four_seeds), "merge": {"method": "random", "rank": 8}, "seeds": [1, 2]}
    outputs = []
    for name in ("first", "second"):
        manifest = write_manifest(tmp_path / "recipes", {**body, "output": {"path": f"../{name}"}}, f"{name}.yaml")
        run_plan(build_plan(load_manifest(manifest), device="cpu"), progress=False)
        outputs.append(tmp_path / name)
    for seed in (1, 2):
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            first = (outputs[0] / f"seed-{seed}" / name).read_bytes()
            assert first == (outputs[1] / f"seed-{seed}" / name).read_bytes()
    seed_1 = (outputs[0] / "seed-1" / "adapter_model.safetensors").read_bytes()
    assert seed_1 != (outputs[0] / "seed-2" / "adapter_model.safetensors").read_bytes()


def test_random_draws_ignore_module_order(base_model, tmp_path, four_seeds):
    everything = merge(tmp_path / "all", sources_of(four_seeds, up="../.."), {"method": "random", "rank": 8}, seeds=[3])
    only_v = merge(
        tmp_path / "v",
        sources_of(four_seeds, up="../.."),
        {"method": "random", "rank": 8, "include": ["v_proj"]},
        seeds=[3],
    )
    full = saved_tensors(everything)
    subset = saved_tensors(only_v)
    assert subset and all(key in full for key in subset)
    for key, value in subset.items():
        assert torch.equal(value, full[key])


def test_per_projection_ranks_reload(base_model, tmp_path, four_seeds):
    output = merge(
        tmp_path,
        sources_of(four_seeds),
        {"method": "block", "rank": 8, "projections": {"v_proj": "cat", "up_proj": {"method": "block", "rank": 4}}},
    )
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["r"] == 8
    assert config["rank_pattern"][r"^model\.layers\.0\.self_attn\.v_proj$"] == 16
    assert config["rank_pattern"][r"^model\.layers\.1\.mlp\.up_proj$"] == 4
    deltas = peft_deltas(base_model, output)  # PEFT must build every shape to load the weights
    assert len(deltas) == 2 * len(TARGETS)


def test_rank_and_alpha_patterns_resolved(base_model, tmp_path):
    folder = make_adapter(
        base_model,
        tmp_path / "patterned",
        3,
        r=4,
        alpha=8,
        rank_pattern={"v_proj": 2, "model.layers.1.mlp.up_proj": 6},
        alpha_pattern={"q_proj": 3},
    )
    output = merge(tmp_path, sources_of([folder]), {"method": "cat"})
    assert_deltas_close(peft_deltas(base_model, output), peft_deltas(base_model, folder))


def test_bin_source_matches_safetensors(base_model, tmp_path):
    safe = make_adapter(base_model, tmp_path / "safe", 9)
    pickled = make_adapter(base_model, tmp_path / "pickled", 9, save_format="bin")
    assert (pickled / "adapter_model.bin").is_file()
    first = merge(tmp_path / "one", sources_of([safe], up="../.."), {"method": "cat"})
    second = merge(tmp_path / "two", sources_of([pickled], up="../.."), {"method": "cat"})
    assert (first / "adapter_model.safetensors").read_bytes() == (second / "adapter_model.safetensors").read_bytes()


def test_bfloat16_sources_keep_dtype(base_model, tmp_path):
    folders = [make_adapter(base_model, tmp_path / f"s{seed}", seed, dtype=torch.bfloat16) for seed in (1, 2)]
    output = merge(tmp_path, sources_of(folders), {"method": "block", "rank": 8})
    assert {tensor.dtype for tensor in saved_tensors(output).values()} == {torch.bfloat16}
