"""The real command line in a subprocess: exit codes, FILE:LINE:COL messages, plan and run output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_adapter, run_cli, write_manifest
from lorakit.methods import method_names
from lorakit.schema import load_schema


@pytest.fixture()
def recipe(base_model, tmp_path):
    for seed in (1, 2):
        make_adapter(base_model, tmp_path / f"s{seed}", seed)
    body = {
        "version": 1,
        "sources": [{"path": "../s1"}, {"path": "../s2"}],
        "merge": {"method": "block", "rank": 8},
        "output": {"path": "../out"},
    }
    return write_manifest(tmp_path / "recipes", body)


def test_version_prints_number():
    result = run_cli("--version")
    assert result.returncode == 0
    assert "lorakit, version" in result.stdout


def test_validate_valid_manifest(recipe):
    result = run_cli("validate", str(recipe))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{recipe}: valid"


def test_validate_reports_every_error_with_position(tmp_path):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(
        "version: 1\n"
        "sources:\n"
        "  - path: ../a\n"
        "    wieght: 2\n"
        "merge:\n"
        "  method: blok\n"
        "  rank: 0\n"
        "output: {path: ../out}\n"
    )
    result = run_cli("validate", "--no-sources", str(manifest))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"{manifest}:4:5: unknown key 'wieght'")
    assert "did you mean 'weight'" in lines[0]
    assert lines[1].startswith(f"{manifest}:6:11: merge.method: 'blok' is not valid")
    assert "block" in lines[1]
    assert lines[2].startswith(f"{manifest}:7:9: merge.rank must be >= 1")
    assert "Traceback" not in result.stderr


def test_validate_checks_sources_unless_disabled(tmp_path):
    body = {"version": 1, "sources": [{"path": "../missing"}], "merge": {"method": "cat"}, "output": {"path": "../out"}}
    manifest = write_manifest(tmp_path / "recipes", body)
    assert run_cli("validate", "--no-sources", str(manifest)).returncode == 0
    result = run_cli("validate", str(manifest))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{manifest}:5:15: source 'missing'")  # the value of sources[0].path
    assert "adapter folder not found" in result.stderr


def test_plan_prints_groups_without_output(recipe, tmp_path):
    result = run_cli("plan", "--device", "cpu", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "q_proj" in result.stdout and "block (rank=8)" in result.stdout
    assert "estimated peak tensor memory" in result.stdout
    assert not (tmp_path / "out").exists()

    as_json = json.loads(run_cli("plan", "--json", "--device", "cpu", str(recipe)).stdout)
    assert {group["projection"] for group in as_json["groups"]} == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    assert as_json["bytes_read"] > 0


def test_run_writes_then_refuses_existing(recipe, tmp_path):
    first = run_cli("run", "--device", "cpu", "--no-progress", str(recipe))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "provenance.json",
    ]

    second = run_cli("run", "--device", "cpu", str(recipe))
    assert second.returncode == 2  # an existing output is an I/O refusal, see docs/errors.md
    assert "already exists" in second.stderr and "--force" in second.stderr

    forced = run_cli("run", "--device", "cpu", "--force", "--no-progress", str(recipe))
    assert forced.returncode == 0, forced.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_manifest_is_io_error(tmp_path):
    result = run_cli("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "manifest not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_unavailable_device_is_rejected(recipe):
    result = run_cli("plan", "--device", "tpu", str(recipe))
    assert result.returncode == 1
    assert "unknown device 'tpu'" in result.stderr


def test_schema_enum_lists_every_method():
    assert load_schema()["$defs"]["method"]["enum"] == method_names()


def test_force_keeps_folder_lorakit_did_not_write(recipe, tmp_path):
    precious = tmp_path / "out"
    (precious / "sub").mkdir(parents=True)
    (precious / "notes.txt").write_text("keep me")

    result = run_cli("run", "--device", "cpu", "--force", "--no-progress", str(recipe))

    assert result.returncode == 2
    assert "is not a lorakit output" in result.stderr
    assert (precious / "notes.txt").read_text() == "keep me"
    assert (precious / "sub").is_dir()


def test_exponent_weight_is_a_number(base_model, tmp_path):
    make_adapter(base_model, tmp_path / "s1", 1)
    manifest = tmp_path / "recipes" / "m.yaml"
    manifest.parent.mkdir()
    manifest.write_text("version: 1\nsources: [{path: ../s1, weight: 5e-1}]\nmerge: {method: cat}\noutput: {path: ../out}\n")

    result = run_cli("validate", str(manifest))

    assert result.returncode == 0, result.stderr


def test_overflowing_output_dtype_is_rejected(base_model, tmp_path):
    make_adapter(base_model, tmp_path / "s1", 1)
    manifest = tmp_path / "recipes" / "m.yaml"
    manifest.parent.mkdir()
    manifest.write_text(
        "version: 1\nsources: [{path: ../s1, weight: 1.0e+300}]\nmerge: {method: cat}\n"
        "output: {path: ../out, dtype: float16}\n"
    )

    result = run_cli("run", "--device", "cpu", "--no-progress", str(manifest))

    assert result.returncode == 1
    assert "has NaN or Inf values in torch.float16" in result.stderr
    assert not (tmp_path / "out").exists()


def wait_for_torch_load(process: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until ``process`` has mapped libtorch, so it is importing torch and no command has started."""
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "libtorch" in maps.read_text():
            return
        time.sleep(0.005)
    raise AssertionError(f"process {process.pid} did not load libtorch within {timeout} s")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
@pytest.mark.parametrize("entry", ["module", "script"])
def test_interrupt_during_import(entry, recipe):
    if entry == "module":
        command = [sys.executable, "-m", "lorakit.cli"]
    else:
        script = shutil.which("lorakit", path=str(Path(sys.executable).parent))
        if script is None:
            pytest.skip("the lorakit console script is not installed next to this Python")
        command = [script]
    process = subprocess.Popen([*command, "validate", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    wait_for_torch_load(process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert stderr == "error: interrupted; no output was written\n"
    assert stdout == ""


def test_symlink_loop_source_is_invalid(tmp_path):
    (tmp_path / "loop2").symlink_to("loop1")
    (tmp_path / "loop1").symlink_to("loop2")
    body = {"version": 1, "sources": [{"path": "../loop1"}], "merge": {"method": "cat"}, "output": {"path": "../out"}}
    manifest = write_manifest(tmp_path / "recipes", body)

    result = run_cli("validate", str(manifest))

    assert result.returncode == 1, result.stderr
    assert "cannot resolve the path '../loop1'" in result.stderr
    assert "fix the symbolic links on it" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_weights_rejected_without_blocking(base_model, tmp_path):
    folder = make_adapter(base_model, tmp_path / "fifo", 1)
    (folder / "adapter_model.safetensors").unlink()
    os.mkfifo(folder / "adapter_model.safetensors")
    body = {"version": 1, "sources": [{"path": "../fifo"}], "merge": {"method": "cat"}, "output": {"path": "../out"}}
    manifest = write_manifest(tmp_path / "recipes", body)

    result = run_cli("validate", str(manifest))

    assert result.returncode == 2, result.stderr
    assert "adapter_model.safetensors: not a regular file (a FIFO, socket or device)" in result.stderr


def test_foreign_folder_message_skips_force(recipe, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")

    result = run_cli("run", "--device", "cpu", "--no-progress", str(recipe))

    assert result.returncode == 2
    assert "is not a lorakit output (no provenance.json), so --force does not replace it" in result.stderr
    assert "pass --force" not in result.stderr


def test_output_below_a_file_names_it(base_model, tmp_path):
    for seed in (1, 2):
        make_adapter(base_model, tmp_path / f"s{seed}", seed)
    (tmp_path / "afile").write_text("not a folder")
    body = {
        "version": 1,
        "sources": [{"path": "../s1"}, {"path": "../s2"}],
        "merge": {"method": "cat"},
        "output": {"path": "../afile/sub/out"},
    }
    manifest = write_manifest(tmp_path / "recipes", body)

    result = run_cli("run", "--device", "cpu", "--no-progress", str(manifest))

    assert result.returncode == 2, result.stderr
    assert f"because {tmp_path / 'afile'} is a file, not a folder" in result.stderr
    assert (tmp_path / "afile").read_text() == "not a folder"
