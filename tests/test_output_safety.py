"""Nothing half-written: interrupted, killed, concurrent and failing runs through the real CLI.

A run builds its output in ``.NAME.lorakit-<pid>-<hex>`` beside the output, holds the lock file
``.NAME.lorakit-lock`` while it works, and renames the finished folder into place. These tests
interrupt that at every stage and check the output folder, its previous contents and what is left
beside it.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import make_adapter, write_manifest
from lorakit.cli import _guarded
from forked_cli import run_cli_batch
from corpus_support import leftovers, tree_digest

# Big enough that writing the output takes a while, so the tests can pause the run with SIGSTOP
# while it writes: 16 modules × 2 factors × 64 × 1024 float32 = 8 MiB per source.
BIG_LAYERS, BIG_WIDTH, BIG_RANK = 16, 1024, 64


def write_synthetic_adapter(folder: Path, seed: int) -> None:
    """Write a LoRA adapter of q_proj modules directly with safetensors, without a model."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(BIG_LAYERS):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(BIG_RANK, BIG_WIDTH, generator=generator)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(BIG_WIDTH, BIG_RANK, generator=generator)
    save_file(tensors, str(folder / "adapter_model.safetensors"), {"format": "pt"})
    config = {"peft_type": "LORA", "r": BIG_RANK, "lora_alpha": BIG_RANK, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def workspace(base_model, tmp_path_factory) -> Path:
    """Two big synthetic sources (big.yaml) and two small PEFT ones (small.yaml), both writing ../out."""
    root = tmp_path_factory.mktemp("safety")
    write_synthetic_adapter(root / "big1", seed=1)
    write_synthetic_adapter(root / "big2", seed=2)
    make_adapter(base_model, root / "small1", seed=1)
    make_adapter(base_model, root / "small2", seed=2)
    for name, sources in (("big", ["big1", "big2"]), ("small", ["small1", "small2"])):
        body = {
            "version": 1,
            "sources": [{"path": f"../{source}"} for source in sources],
            "merge": {"method": "cat"},
            "output": {"path": "../out"},
        }
        write_manifest(root / "recipes", body, name=f"{name}.yaml")
    return root


@pytest.fixture()
def out(workspace) -> Path:
    """The output path both manifests write, removed with anything beside it after each test."""
    target = workspace / "out"
    yield target
    shutil.rmtree(target, ignore_errors=True)
    for path in workspace.glob(".out.lorakit-*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def make_previous_output(target: Path) -> dict[str, str]:
    """Put a stand-in previous output at ``target`` and return its digest."""
    target.mkdir()
    (target / "adapter_model.safetensors").write_bytes(b"previous weights")
    (target / "adapter_config.json").write_text('{"previous": true}')
    (target / "provenance.json").write_text('{"lorakit_provenance": 1}')  # --force replaces only lorakit outputs
    return tree_digest(target)


def start_cli(*args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lorakit.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def wait_for_writing(process: subprocess.Popen, parent: Path, timeout: float = 60) -> Path:
    """Return the temporary output folder once the run has started writing its weights into it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for folder in parent.glob(".out.lorakit-*-*"):
            if (folder / "adapter_model.safetensors").exists():
                return folder
        assert process.poll() is None, f"the run ended before writing: {process.communicate()}"
        time.sleep(0.005)
    raise AssertionError("the run never started writing its output")


def pause_while_writing(process: subprocess.Popen, parent: Path) -> Path:
    """Stop the run with SIGSTOP once it writes its output, so the next step surely lands mid-write."""
    temporary = wait_for_writing(process, parent)
    process.send_signal(signal.SIGSTOP)
    assert process.poll() is None, "the run finished before it could be paused"
    assert temporary.exists()
    return temporary


def assert_complete_output(target: Path) -> None:
    """Check that ``target`` contains a whole output whose files match the hashes in its provenance."""
    provenance = json.loads((target / "provenance.json").read_text())
    for name, digest in provenance["files"].items():
        assert tree_digest(target)[name] == digest
    load_file(str(target / "adapter_model.safetensors"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_keeps_previous_output(signum, workspace, out):
    previous = make_previous_output(out)
    sources = tree_digest(workspace / "big1")

    process = start_cli("run", "--force", "--no-progress", str(workspace / "recipes" / "big.yaml"))
    pause_while_writing(process, workspace)
    process.send_signal(signum)
    process.send_signal(signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert stderr.strip() == "error: interrupted; no output was written"
    assert stdout == ""
    assert tree_digest(out) == previous
    assert leftovers(workspace) == []
    assert tree_digest(workspace / "big1") == sources


def test_interrupt_without_previous_output_leaves_nothing(workspace, out):
    process = start_cli("run", "--no-progress", str(workspace / "recipes" / "big.yaml"))
    pause_while_writing(process, workspace)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert not out.exists()
    assert leftovers(workspace) == []


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_concurrent_run_fails_cleanly(force, workspace, out):
    flags = ["--force"] if force else []
    recipe = str(workspace / "recipes" / "big.yaml")

    first = start_cli("run", "--no-progress", *flags, recipe)
    pause_while_writing(first, workspace)
    try:
        second = start_cli("run", "--no-progress", *flags, recipe)
        second_stdout, second_stderr = second.communicate(timeout=60)
    finally:
        first.send_signal(signal.SIGCONT)
    first_stdout, first_stderr = first.communicate(timeout=60)

    assert first.returncode == 0, first_stderr
    assert first_stdout.strip() == str(out)
    assert second.returncode == 2, second_stderr
    assert second_stderr.strip() == (
        f"error: {out}: another lorakit run (process {first.pid}) is writing this output; wait for it to finish "
        "or choose another output.path"
    )
    assert second_stdout == ""
    assert_complete_output(out)
    assert leftovers(workspace) == []


def test_simultaneous_runs_one_succeeds(workspace, out):
    recipe = str(workspace / "recipes" / "small.yaml")
    processes = [start_cli("run", "--no-progress", recipe) for _ in range(2)]
    results = [process.communicate(timeout=60) for process in processes]
    codes = sorted(process.returncode for process in processes)

    assert codes == [0, 2], results
    failed = next(stderr for process, (_, stderr) in zip(processes, results) if process.returncode == 2)
    # Depending on timing the loser meets the lock or the finished output.
    assert "another lorakit run" in failed or "output already exists" in failed
    assert_complete_output(out)
    assert leftovers(workspace) == []


def test_killed_run_leftovers_are_removed(workspace, out):
    process = start_cli("run", "--no-progress", str(workspace / "recipes" / "big.yaml"))
    temporary = pause_while_writing(process, workspace)
    process.kill()
    process.communicate(timeout=60)
    assert temporary.exists()  # SIGKILL cannot be handled, so the temporary folder stays

    result, = run_cli_batch([["-v", "run", "--no-progress", str(workspace / "recipes" / "small.yaml")]], workspace.parent / "killed-logs")

    assert result.returncode == 0, result.stderr
    assert f"removing {temporary}, left by a killed run" in result.stderr
    assert_complete_output(out)
    assert leftovers(workspace) == []


def test_previous_output_moved_aside_is_restored(workspace, out):
    """A run killed between its two final renames leaves the old output as .out.lorakit-old-*."""
    backup = workspace / ".out.lorakit-old-0123abcd"
    previous = make_previous_output(backup)

    result, = run_cli_batch([["run", "--no-progress", str(workspace / "recipes" / "small.yaml")]], workspace.parent / "restore-logs")

    assert result.returncode == 2
    assert f"a killed run left the previous output at {backup}; putting it back" in result.stderr
    assert f"error: {out}: output already exists; pass --force to replace it" in result.stderr
    assert tree_digest(out) == previous
    assert leftovers(workspace) == []


def test_existing_output_needs_force(workspace, out):
    recipe = str(workspace / "recipes" / "small.yaml")
    previous = make_previous_output(out)

    refused, forced = run_cli_batch([["run", recipe], ["run", "--force", "--no-progress", recipe]], workspace.parent / "force-logs")

    assert refused.returncode == 2
    assert refused.stderr.strip() == f"error: {out}: output already exists; pass --force to replace it, or change output.path"
    assert forced.returncode == 0, forced.stderr
    assert tree_digest(out) != previous
    assert_complete_output(out)
    assert leftovers(workspace) == []


def limit_file_size() -> None:
    # Writes past 64 KiB then fail with EFBIG, as on a full disk, instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_full_disk_keeps_previous_output(workspace, out):
    previous = make_previous_output(out)

    process = start_cli("run", "--force", "--no-progress", str(workspace / "recipes" / "big.yaml"), preexec_fn=limit_file_size)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 2, stderr
    assert stderr.strip() == f"error: {out}: writing the output failed: File too large"
    assert tree_digest(out) == previous
    assert leftovers(workspace) == []


# Root reads every file regardless of its mode; without these capabilities it obeys the mode bits.
DROP_ROOT_OVERRIDES = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root without setpriv reads every file")
def test_permission_denied_is_io_error(base_model, tmp_path):
    make_adapter(base_model, tmp_path / "s1", seed=1)
    make_adapter(base_model, tmp_path / "s2", seed=2)
    make_adapter(base_model, tmp_path / "s3", seed=3)
    body = {"version": 1, "sources": [{"path": "../s1"}, {"path": "../s2"}], "merge": {"method": "cat"}, "output": {"path": "../locked/out"}}
    manifest = write_manifest(tmp_path / "recipes", body, name="locked-output.yaml")
    unreadable_manifest = write_manifest(tmp_path / "recipes", body, name="unreadable.yaml")
    body = {**body, "sources": [{"path": "../s1"}, {"path": "../s3"}], "output": {"path": "../out"}}
    unreadable_source = write_manifest(tmp_path / "recipes", body, name="unreadable-source.yaml")
    (tmp_path / "locked").mkdir()
    os.chmod(tmp_path / "locked", 0o555)
    os.chmod(unreadable_manifest, 0)
    os.chmod(tmp_path / "s3" / "adapter_model.safetensors", 0)

    results = run_cli_batch(
        [["run", str(manifest)], ["run", str(unreadable_manifest)], ["run", str(unreadable_source)]],
        tmp_path / "logs",
        prefix=DROP_ROOT_OVERRIDES,
    )

    locked, manifest_denied, source_denied = results
    assert locked.returncode == 2, locked.stderr
    assert locked.stderr.strip() == f"error: {tmp_path / 'locked' / 'out'}: cannot create the output folder: Permission denied"
    assert manifest_denied.returncode == 2, manifest_denied.stderr
    assert manifest_denied.stderr.strip() == f"error: {unreadable_manifest}: cannot read the manifest: Permission denied"
    assert source_denied.returncode == 2, source_denied.stderr
    assert source_denied.stderr.startswith(f"error: {unreadable_source}:")
    assert f"source 's3': {tmp_path / 's3' / 'adapter_model.safetensors'}: cannot read: Permission denied" in source_denied.stderr
    assert list((tmp_path / "locked").iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_interrupt_inside_native_code_reports_interrupt():
    """safetensors can turn the KeyboardInterrupt of a SIGINT into a ValueError; it is still an interrupt."""

    @click.command()
    @_guarded
    def command() -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt as error:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from error

    result = CliRunner().invoke(command, [])

    assert result.exit_code == 130, result.output
    assert result.output.strip() == "error: interrupted; no output was written"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
