"""lorakit verify: hashes against provenance.json, seed folders, and --rerun from the recorded manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_adapter, run_cli, tiny_llama, write_manifest
from safetensors.torch import load_file, save_file

from lorakit.errors import LorakitError, OutputError
from lorakit.execute import run_plan
from lorakit.manifest import load_manifest
from lorakit.plan import build_plan
from lorakit.provenance import file_sha256
from lorakit.verify import verify_outputs


def _merge(manifest: Path) -> None:
    run_plan(build_plan(load_manifest(manifest), device="cpu"), progress=False)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recipe folder with two adapters, a block merge and a two-seed random merge, both run."""
    root = tmp_path_factory.mktemp("recipes")
    base = tiny_llama()
    make_adapter(base, root / "adapters" / "a", seed=1, r=4, alpha=8)
    make_adapter(base, root / "adapters" / "b", seed=2, r=4, alpha=8)
    sources = [{"path": "../adapters/a"}, {"path": "../adapters/b", "weight": 0.5}]
    write_manifest(
        root / "manifests",
        {"version": 1, "sources": sources, "merge": {"method": "block", "rank": 6}, "output": {"path": "../output/block"}},
        name="block.yaml",
    )
    write_manifest(
        root / "manifests",
        {
            "version": 1,
            "sources": sources,
            "merge": {"method": "random", "rank": 4},
            "seeds": [7, 8],
            "output": {"path": "../output/random"},
        },
        name="random.yaml",
    )
    _merge(root / "manifests" / "block.yaml")
    _merge(root / "manifests" / "random.yaml")
    return root


def _copy_output(recipes: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(recipes / "output" / name, target)
    return target


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_intact_output_passes(recipes: Path) -> None:
    checks = verify_outputs(recipes / "output" / "block")

    assert [check.ok for check in checks] == [True]
    assert sorted(check.name for check in checks[0].files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors", "README.md"])
def test_verify_flipped_byte_fails(recipes: Path, tmp_path: Path, name: str) -> None:
    output = _copy_output(recipes, "block", tmp_path)
    path = output / name
    _flip_byte(path, path.stat().st_size // 2)

    (check,) = verify_outputs(output)

    assert not check.ok
    assert [item.name for item in check.files if not item.ok] == [name]
    assert any(str(path) in problem and "differs" in problem for problem in check.problems())


def test_verify_cli_flipped_byte_exits_1(recipes: Path, tmp_path: Path) -> None:
    output = _copy_output(recipes, "block", tmp_path)
    weights = output / "adapter_model.safetensors"
    _flip_byte(weights, weights.stat().st_size - 1)

    result = run_cli("verify", str(output))

    assert result.returncode == 1, result.stderr
    assert f"{weights}: sha256" in result.stderr
    assert "adapter_config.json" not in result.stderr


def test_verify_missing_file_fails(recipes: Path, tmp_path: Path) -> None:
    output = _copy_output(recipes, "block", tmp_path)
    (output / "README.md").unlink()

    (check,) = verify_outputs(output)

    assert not check.ok
    assert any("README.md: missing" in problem for problem in check.problems())


def test_verify_unrecorded_file_is_listed_not_failed(recipes: Path, tmp_path: Path) -> None:
    output = _copy_output(recipes, "block", tmp_path)
    (output / "notes.txt").write_text("added by hand\n")
    (output / ".gitattributes").write_text("*.safetensors filter=lfs\n")

    (check,) = verify_outputs(output)

    assert check.ok
    assert check.extra_files == ["notes.txt"]


def test_verify_seed_parent_checks_every_seed(recipes: Path, tmp_path: Path) -> None:
    output = _copy_output(recipes, "random", tmp_path)
    _flip_byte(output / "seed-8" / "adapter_config.json", 10)

    checks = verify_outputs(output)

    assert [(check.folder.name, check.seed, check.ok) for check in checks] == [("seed-7", 7, True), ("seed-8", 8, False)]


def test_verify_folder_without_record_fails(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")

    with pytest.raises(LorakitError, match="no provenance.json"):
        verify_outputs(tmp_path)
    with pytest.raises(OutputError, match="not found"):
        verify_outputs(tmp_path / "absent")


def test_verify_record_with_path_in_file_name_fails(recipes: Path, tmp_path: Path) -> None:
    output = _copy_output(recipes, "block", tmp_path)
    record = json.loads((output / "provenance.json").read_text())
    record["files"]["../escape"] = "0" * 64
    (output / "provenance.json").write_text(json.dumps(record))

    with pytest.raises(LorakitError, match="invalid entry '../escape'"):
        verify_outputs(output)


def test_verify_cli_exit_codes(recipes: Path, tmp_path: Path) -> None:
    passed = run_cli("verify", str(recipes / "output" / "random"))
    not_output = run_cli("verify", str(tmp_path))
    missing = run_cli("verify", str(tmp_path / "absent"))

    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.count(": ok, 3 files match provenance.json") == 2
    assert not_output.returncode == 1
    assert "no provenance.json" in not_output.stderr
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr + not_output.stderr


def test_verify_rerun_reproduces_outputs(recipes: Path) -> None:
    checks = verify_outputs(recipes / "output" / "random", rerun=True)

    assert [check.ok for check in checks] == [True, True]
    for check in checks:
        assert [item.name for item in check.rerun] == ["adapter_config.json", "adapter_model.safetensors"]
        assert check.rerun_manifest == str((recipes / "manifests" / "random.yaml").resolve())


def test_verify_rerun_single_seed_folder(recipes: Path) -> None:
    (check,) = verify_outputs(recipes / "output" / "random" / "seed-8", rerun=True)

    assert check.ok, check.problems()
    assert check.seed == 8


def test_verify_rerun_changed_manifest_uses_record(recipes: Path, tmp_path: Path) -> None:
    root = tmp_path / "recipes"
    shutil.copytree(recipes / "adapters", root / "adapters")
    manifest = write_manifest(
        root / "manifests",
        {"version": 1, "sources": [{"path": "../adapters/a"}, {"path": "../adapters/b"}], "merge": {"method": "cat"}, "output": {"path": "../output/cat"}},
    )
    _merge(manifest)
    manifest.write_text(manifest.read_text().replace('"cat"', '"soups"', 1))

    (check,) = verify_outputs(root / "output" / "cat", rerun=True)

    assert check.ok, check.problems()
    assert check.rerun_manifest.startswith("normalised manifest from provenance.json")
    assert check.rerun_manifest.endswith("merge.yaml has changed")


def test_verify_rerun_changed_source_fails(recipes: Path, tmp_path: Path) -> None:
    root = tmp_path / "recipes"
    shutil.copytree(recipes / "adapters", root / "adapters")
    manifest = write_manifest(
        root / "manifests",
        {"version": 1, "sources": [{"path": "../adapters/a"}, {"path": "../adapters/b"}], "merge": {"method": "cat"}, "output": {"path": "../output/cat"}},
    )
    _merge(manifest)
    make_adapter(tiny_llama(), root / "adapters" / "b", seed=99, r=4, alpha=8)

    (check,) = verify_outputs(root / "output" / "cat", rerun=True)

    assert not check.ok
    assert all(item.ok for item in check.files)
    weights = root / "adapters" / "b" / "adapter_model.safetensors"
    assert any(problem.startswith(f"{weights}: sha256") and "source 'b'" in problem for problem in check.rerun_problems)


def test_verify_rerun_detects_forged_record(recipes: Path, tmp_path: Path) -> None:
    output = _copy_output(recipes, "block", tmp_path)
    weights = output / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    record = json.loads((output / "provenance.json").read_text())
    record["files"]["adapter_model.safetensors"] = file_sha256(weights)
    (output / "provenance.json").write_text(json.dumps(record))

    (plain,) = verify_outputs(output)
    (rerun,) = verify_outputs(output, rerun=True)

    assert plain.ok
    assert not rerun.ok
    problems = "\n".join(rerun.problems())
    assert f"{weights}: the rerun wrote different bytes" in problems
    assert f"first differing tensor {key!r}" in problems
    assert "max |difference| 1" in problems


def test_verify_cli_rerun_json(recipes: Path) -> None:
    result = run_cli("verify", "--rerun", "--json", str(recipes / "output" / "block"))

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    (output,) = report["outputs"]
    assert [item["ok"] for item in output["rerun"]["files"]] == [True, True]
    assert output["rerun"]["manifest"].endswith("block.yaml")


def test_verify_rerun_device_note(recipes: Path, tmp_path: Path) -> None:
    output = _copy_output(recipes, "block", tmp_path)
    record = json.loads((output / "provenance.json").read_text())
    record["device"] = "cuda:0"
    record["files"]["adapter_config.json"] = "0" * 64
    (output / "provenance.json").write_text(json.dumps(record))

    (check,) = verify_outputs(output, rerun=True, device="cpu")

    config = next(item for item in check.rerun if item.name == "adapter_config.json")
    assert not config.ok
    assert "the rerun ran on cpu, the merge on cuda:0" in config.detail
