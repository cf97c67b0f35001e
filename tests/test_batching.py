"""Batched execution against per-module execution: one batch per group versus one module per batch.

``batch_bytes=1`` makes every batch a single module, which is the unbatched merge. block, random
and cat must give byte-identical files, and soups must agree to float32 rounding.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import make_adapter, peft_deltas, saved_tensors, write_manifest
from lorakit.errors import AdapterError
from lorakit.execute import GroupTiming, run_plan
from lorakit.manifest import load_manifest
from lorakit.plan import build_plan

METHODS = {
    "block": {"method": "block", "rank": 10},
    "random": {"method": "random", "rank": 6},
    "cat": {"method": "cat"},
    "soups": {"method": "soups"},
}
EXACT = ("block", "random", "cat")
# Large enough for every group of the test adapters to run as one batch.
ONE_BATCH = 256 * 2**20
SEEDS = [11, 12]

# (save format, stored dtype, output dtype) of the sources and the output.
STORAGE = [
    ("safetensors", torch.float32, "source"),
    ("bin", torch.float32, "source"),
    ("safetensors", torch.bfloat16, "source"),
    ("safetensors", torch.float32, "float16"),
]


@pytest.fixture(scope="module", params=STORAGE, ids=lambda storage: f"{storage[0]}-{str(storage[1])[6:]}-{storage[2]}")
def sources(request, base_model, tmp_path_factory) -> tuple[list[Path], str]:
    save_format, dtype, output_dtype = request.param
    root = tmp_path_factory.mktemp(f"sources-{save_format}")
    folders = [
        make_adapter(base_model, root / f"s{seed}", seed, r=4, alpha=alpha, save_format=save_format, dtype=dtype)
        for seed, alpha in ((1, 8), (2, 8), (3, 12))
    ]
    return folders, output_dtype


def run(folder: Path, sources: list[Path], merge: dict, output_dtype: str, batch_bytes: int, timings: list) -> Path:
    body = {
        "version": 1,
        "sources": [{"path": str(source), "weight": weight} for source, weight in zip(sources, (0.5, 1.0, -0.25))],
        "merge": merge,
        "output": {"path": "../out", "dtype": output_dtype},
    }
    if merge["method"] == "random":
        body["seeds"] = SEEDS
    manifest = write_manifest(folder / "recipe", body)
    run_plan(build_plan(load_manifest(manifest), device="cpu", batch_bytes=batch_bytes), progress=False, timings=timings)
    return folder / "out"


def weight_files(output: Path) -> list[Path]:
    return sorted(output.rglob("adapter_model.safetensors"))


@pytest.mark.parametrize("method", list(METHODS))
def test_batched_equals_per_module(tmp_path, sources, method):
    folders, output_dtype = sources
    batched_timings: list[GroupTiming] = []
    single_timings: list[GroupTiming] = []
    batched = run(tmp_path / "batched", folders, METHODS[method], output_dtype, ONE_BATCH, batched_timings)
    single = run(tmp_path / "single", folders, METHODS[method], output_dtype, 1, single_timings)

    assert all(timing.batches == 1 for timing in batched_timings)
    assert all(timing.batches == timing.modules == 2 for timing in single_timings)
    batched_files, single_files = weight_files(batched), weight_files(single)
    assert len(batched_files) == (len(SEEDS) if method == "random" else 1)
    assert [path.relative_to(batched) for path in batched_files] == [path.relative_to(single) for path in single_files]
    for batched_file, single_file in zip(batched_files, single_files):
        for weights in (batched_file, single_file):
            provenance = json.loads((weights.parent / "provenance.json").read_text())
            assert provenance["files"]["adapter_model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        if method in EXACT:
            assert batched_file.read_bytes() == single_file.read_bytes()
        else:
            batched_tensors, single_tensors = saved_tensors(batched_file.parent), saved_tensors(single_file.parent)
            assert list(batched_tensors) == list(single_tensors)
            for key, tensor in batched_tensors.items():
                torch.testing.assert_close(tensor, single_tensors[key], rtol=2e-7, atol=1e-9)


def test_batched_block_is_mean_delta(base_model, tmp_path):
    """Full-rank block over equal-weight sources, batched across layers, is the mean of PEFT's deltas."""
    folders = [make_adapter(base_model, tmp_path / f"s{seed}", seed, r=4, alpha=8) for seed in (1, 2, 3)]
    body = {"version": 1, "sources": [{"path": f"../{folder.name}"} for folder in folders], "merge": {"method": "block", "rank": 12}, "output": {"path": "../out"}}
    timings: list[GroupTiming] = []
    run_plan(build_plan(load_manifest(write_manifest(tmp_path / "recipe", body)), device="cpu"), progress=False, timings=timings)

    assert all(timing.batches == 1 and timing.modules == 2 for timing in timings)
    expected_parts = [peft_deltas(base_model, folder) for folder in folders]
    merged = peft_deltas(base_model, tmp_path / "out")
    for path, delta in merged.items():
        expected = sum(part[path] for part in expected_parts) / 3
        assert (delta - expected).abs().max().item() <= 1e-6, path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", list(METHODS))
def test_cuda_batched_equals_per_module(tmp_path, base_model, method):
    folders = [make_adapter(base_model, tmp_path / f"s{seed}", seed, r=4, alpha=8) for seed in (1, 2, 3)]
    outputs = []
    for name, batch_bytes in (("batched", ONE_BATCH), ("single", 1)):
        body = {"version": 1, "sources": [{"path": str(folder)} for folder in folders], "merge": METHODS[method], "output": {"path": "../out"}}
        if method == "random":
            body["seeds"] = SEEDS
        manifest = write_manifest(tmp_path / name / "recipe", body)
        run_plan(build_plan(load_manifest(manifest), device="cuda", batch_bytes=batch_bytes), progress=False)
        outputs.append(weight_files(tmp_path / name / "out"))
    for batched_file, single_file in zip(*outputs):
        if method in EXACT:
            assert batched_file.read_bytes() == single_file.read_bytes()
        else:
            for key, tensor in saved_tensors(batched_file.parent).items():
                torch.testing.assert_close(tensor, saved_tensors(single_file.parent)[key], rtol=2e-7, atol=1e-9)


def test_legacy_bin_source_merges_like_safetensors(base_model, tmp_path):
    """A pre-zip pickle has no memory map: it is loaded whole, counted in the estimate, and merges alike."""
    safetensors_folder = make_adapter(base_model, tmp_path / "st", 1, r=4, alpha=8)
    legacy_folder = make_adapter(base_model, tmp_path / "legacy", 1, r=4, alpha=8, save_format="bin")
    state = torch.load(legacy_folder / "adapter_model.bin", weights_only=True)
    torch.save(state, legacy_folder / "adapter_model.bin", _use_new_zipfile_serialization=False)
    partner = make_adapter(base_model, tmp_path / "partner", 2, r=4, alpha=8)

    outputs = []
    for name, first in (("from-st", safetensors_folder), ("from-legacy", legacy_folder)):
        body = {"version": 1, "sources": [{"path": str(first)}, {"path": str(partner)}], "merge": {"method": "cat"}, "output": {"path": "../out"}}
        plan = build_plan(load_manifest(write_manifest(tmp_path / name / "recipe", body)), device="cpu")
        legacy_bytes = (legacy_folder / "adapter_model.bin").stat().st_size
        assert plan.adapters[0].resident_bytes() == (legacy_bytes if first == legacy_folder else 0)
        run_plan(plan, progress=False)
        outputs.append((tmp_path / name / "out" / "adapter_model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]


def test_source_truncated_after_planning(base_model, tmp_path):
    folders = [make_adapter(base_model, tmp_path / f"s{seed}", seed, r=4, alpha=8) for seed in (1, 2)]
    body = {"version": 1, "sources": [{"path": str(folder)} for folder in folders], "merge": {"method": "cat"}, "output": {"path": "../out"}}
    plan = build_plan(load_manifest(write_manifest(tmp_path / "recipe", body)), device="cpu")
    weights = folders[1] / "adapter_model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size - 16)

    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: the file ends inside tensor"):
        run_plan(plan, progress=False)
    assert not (tmp_path / "out").exists()
