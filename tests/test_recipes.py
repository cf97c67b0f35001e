"""The pre-commit hook and the GitHub Actions recipe run their commands as a recipe repository would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_manifest

REPOSITORY = Path(__file__).resolve().parents[1]

VALID = {
    "version": 1,
    "sources": [{"path": "../adapters/seed100"}, {"path": "../adapters/seed200"}],
    "merge": {"method": "block", "rank": 64},
    "output": {"path": "../output/block64"},
}
INVALID = {**VALID, "merge": {"method": "block", "rank": 64, "densty": 0.3}}


@pytest.fixture
def lorakit_on_path(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has a `lorakit` command running this checkout, as pip would install it."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "lorakit"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lorakit.cli "$@"\n')
    script.chmod(0o755)
    environment = dict(os.environ)
    environment["PATH"] = f"{folder}{os.pathsep}{environment['PATH']}"
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    return environment


@pytest.fixture
def recipe_repository(tmp_path: Path) -> Path:
    """A recipe repository without weights: manifests/ and nothing else."""
    root = tmp_path / "recipes"
    write_manifest(root / "manifests", VALID, name="block64.yaml")
    return root


def _hook() -> dict:
    hooks = yaml.safe_load((REPOSITORY / ".pre-commit-hooks.yaml").read_text())
    assert [hook["id"] for hook in hooks] == ["lorakit-validate"]
    return hooks[0]


def test_hook_selects_manifest_files() -> None:
    pattern = re.compile(_hook()["files"])

    selected = ["manifests/block64.yaml", "manifests/ties.yml", "recipes/manifests/sub/a.yaml"]
    ignored = ["manifests/manifest.schema.json", "block64.yaml", "config/manifests.yaml", ".pre-commit-config.yaml"]

    assert [path for path in selected if not pattern.search(path)] == []
    assert [path for path in ignored if pattern.search(path)] == []


def test_hook_command_checks_manifests(lorakit_on_path: dict, recipe_repository: Path) -> None:
    hook = _hook()
    write_manifest(recipe_repository / "manifests", INVALID, name="broken.yaml")
    command = [*hook["entry"].split(), *hook["args"]]

    passed = subprocess.run([*command, "manifests/block64.yaml"], cwd=recipe_repository, env=lorakit_on_path, capture_output=True, text=True, timeout=300)
    failed = subprocess.run(
        [*command, "manifests/block64.yaml", "manifests/broken.yaml"], cwd=recipe_repository, env=lorakit_on_path, capture_output=True, text=True, timeout=300
    )

    assert hook["language"] == "python"
    assert passed.returncode == 0, passed.stderr
    assert failed.returncode == 1
    assert "manifests/broken.yaml:" in failed.stderr
    assert "unknown key 'densty'" in failed.stderr


def test_ci_workflow_validates_manifests(lorakit_on_path: dict, recipe_repository: Path) -> None:
    workflow = yaml.safe_load((REPOSITORY / "examples" / "ci" / "github-actions.yml").read_text())
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    (command,) = [step["run"] for step in steps if "lorakit validate" in step.get("run", "")]

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-e", "-c", command], cwd=recipe_repository, env=lorakit_on_path, capture_output=True, text=True, timeout=300)

    passed = run()
    write_manifest(recipe_repository / "manifests", INVALID, name="broken.yaml")
    failed = run()

    assert command.strip() == "lorakit validate --no-sources manifests/*.yaml"
    assert any('pip install "lorakit @ git+' in step.get("run", "") for step in steps)
    assert passed.returncode == 0, passed.stderr
    assert failed.returncode == 1
    assert "manifests/broken.yaml:" in failed.stderr
