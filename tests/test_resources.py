"""Memory and disk checks of `lorakit run` before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_adapter, run_cli, write_manifest

from lorakit import resources
from lorakit.errors import OutputError
from lorakit.manifest import load_manifest
from lorakit.plan import build_plan


@pytest.fixture()
def recipe(base_model, tmp_path) -> Path:
    for seed in (1, 2):
        make_adapter(base_model, tmp_path / f"s{seed}", seed)
    return tmp_path


def write_random(root: Path, rank: int) -> Path:
    body = {
        "version": 1,
        "seeds": [1],
        "sources": [{"path": "../s1"}, {"path": "../s2"}],
        "merge": {"method": "random", "rank": rank},
        "output": {"path": "../out"},
    }
    return write_manifest(root / "recipes", body)


def test_available_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    1000 kB\n")

    assert resources.available_memory(meminfo) == 1000 * 1024
    assert resources.available_memory(tmp_path / "missing") is None


def test_free_disk_space_of_missing_folder(tmp_path):
    assert resources.free_disk_space(tmp_path / "not" / "yet" / "there") == resources.free_disk_space(tmp_path)


def test_run_rejects_rank_beyond_memory(recipe):
    # 10^10 components of 32 + 32 float32 numbers per module: terabytes, beyond any machine.
    manifest = write_random(recipe, 10**10)

    result = run_cli("run", "--device", "cpu", "--no-progress", str(manifest))

    assert result.returncode == 1, result.stderr
    assert "the merge needs an estimated" in result.stderr
    assert "lower the ranks in the manifest" in result.stderr
    assert "--no-resource-check" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (recipe / "out").exists()


def test_check_rejects_output_beyond_disk(recipe, monkeypatch):
    plan = build_plan(load_manifest(write_random(recipe, 8)), device="cpu")
    monkeypatch.setattr(resources, "free_disk_space", lambda path: 100)

    with pytest.raises(OutputError) as raised:
        resources.check_resources(plan)

    assert f"{recipe / 'out'}: the output needs" in str(raised.value)
    assert "but its file system has 100 B free" in str(raised.value)
    for adapter in plan.adapters:
        adapter.close()


def test_run_within_resources_succeeds(recipe):
    result = run_cli("run", "--device", "cpu", "--no-progress", str(write_random(recipe, 8)))

    assert result.returncode == 0, result.stderr
    assert (recipe / "out" / "adapter_model.safetensors").is_file()
