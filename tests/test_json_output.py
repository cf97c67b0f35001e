"""Every --json output of the CLI parses, on success and on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_adapter, run_cli, tiny_llama, write_manifest


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("json")
    base = tiny_llama()
    make_adapter(base, root / "adapters" / "a", seed=1, r=4, alpha=8)
    make_adapter(base, root / "adapters" / "b", seed=2, r=4, alpha=8)
    sources = [{"path": "../adapters/a"}, {"path": "../adapters/b"}]
    write_manifest(root / "manifests", {"version": 1, "sources": sources, "merge": {"method": "block", "rank": 4}, "output": {"path": "../output/good"}}, "good.yaml")
    write_manifest(root / "manifests", {"version": 1, "sources": sources, "merge": {"method": "blok", "rank": 4}, "output": {"path": "../output/bad"}}, "bad.yaml")
    return root


def test_validate_json_one_manifest(project: Path) -> None:
    result = run_cli("validate", "--json", str(project / "manifests" / "good.yaml"))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"manifest": str(project / "manifests" / "good.yaml"), "valid": True, "errors": []}]


def test_validate_json_several_manifests(project: Path) -> None:
    good, bad = project / "manifests" / "good.yaml", project / "manifests" / "bad.yaml"

    result = run_cli("validate", "--json", "--no-sources", str(good), str(bad))

    assert result.returncode == 1
    reports = json.loads(result.stdout)
    assert [(report["manifest"], report["valid"]) for report in reports] == [(str(good), True), (str(bad), False)]
    assert reports[1]["errors"][0].startswith(f"{bad}:")
    assert "did you mean 'block'?" in reports[1]["errors"][0]


def test_plan_json(project: Path) -> None:
    result = run_cli("plan", "--json", "--device", "cpu", str(project / "manifests" / "good.yaml"))

    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["name"] == "good"
    assert {group["projection"] for group in plan["groups"]} == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    assert all(group["output_rank"] == 4 for group in plan["groups"])


def test_inspect_and_verify_json(project: Path) -> None:
    merged = run_cli("run", "--no-progress", str(project / "manifests" / "good.yaml"))
    assert merged.returncode == 0, merged.stderr

    inspected = run_cli("inspect", "--json", str(project / "output" / "good"))
    verified = run_cli("verify", "--json", str(project / "output" / "good"))
    failed = run_cli("verify", "--json", str(project / "adapters" / "a"))

    assert json.loads(inspected.stdout)["r"] == 4
    assert json.loads(verified.stdout)["ok"] is True
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert "no provenance.json" in failed.stderr
