"""Plan warnings: output ranks that store more than a smaller output would, and all-zero weights."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import make_adapter, run_cli, tiny_llama, write_manifest

from lorakit.manifest import load_manifest
from lorakit.plan import build_plan


@pytest.fixture(scope="module")
def rank8_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two rank-8 adapters on q_proj (32 x 32) and v_proj (16 x 32)."""
    root = tmp_path_factory.mktemp("rank8")
    base = tiny_llama()
    for name, seed in (("a", 1), ("b", 2)):
        make_adapter(base, root / "adapters" / name, seed=seed, r=8, alpha=16, targets=["q_proj", "v_proj"])
    return root


def plan_warnings(root: Path, merge: dict, caplog: pytest.LogCaptureFixture) -> list[str]:
    body = {
        "version": 1,
        "seeds": [1],
        "sources": [{"path": "../adapters/a"}, {"path": "../adapters/b"}],
        "merge": merge,
        "output": {"path": "../output/merged"},
    }
    manifest = write_manifest(root / "manifests", body)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        plan = build_plan(load_manifest(manifest), device="cpu")
    for adapter in plan.adapters:
        adapter.close()
    return [record.getMessage() for record in caplog.records if record.name == "lorakit.plan"]


def test_random_rank_above_total(rank8_sources: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Σ r = 16; K = 20 keeps q_proj's factors (20 · 64 = 1280) above the dense 32 · 32 = 1024 too.
    messages = plan_warnings(rank8_sources, {"method": "random", "rank": 20}, caplog)

    random_messages = [message for message in messages if "random rank 20 exceeds the 16 components" in message]
    assert len(random_messages) == 2
    assert random_messages[0].startswith("q_proj: ")
    assert "block with rank 16" in random_messages[0]


def test_factors_larger_than_dense(rank8_sources: Path, caplog: pytest.LogCaptureFixture) -> None:
    # v_proj is 16 x 32: rank 11 factors hold 11 · 48 = 528 numbers, the dense delta 512.
    messages = plan_warnings(rank8_sources, {"method": "block", "rank": 11}, caplog)

    assert messages == [
        "v_proj: rank 11 factors (528 numbers per module) are at least as large as the dense 16 x 32 delta; "
        "a rank below 11 stores less"
    ]


def test_no_warning_for_small_rank(rank8_sources: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert plan_warnings(rank8_sources, {"method": "random", "rank": 10}, caplog) == []
    assert plan_warnings(rank8_sources, {"method": "block", "rank": 10}, caplog) == []


def test_equal_size_warns(rank8_sources: Path, caplog: pytest.LogCaptureFixture) -> None:
    # q_proj is 32 x 32: rank 16 factors hold 16 · 64 = 1024 numbers, as many as the dense delta.
    messages = plan_warnings(rank8_sources, {"method": "cat"}, caplog)

    assert messages[0] == (
        "q_proj: rank 16 factors (1024 numbers per module) are at least as large as the dense 32 x 32 delta; "
        "a rank below 16 stores less"
    )
    assert messages[1].startswith("v_proj: rank 16 factors (768 numbers per module)")


def test_plan_cli_prints_random_warning(rank8_sources: Path) -> None:
    manifest = write_manifest(
        rank8_sources / "manifests",
        {
            "version": 1,
            "seeds": [1],
            "sources": [{"path": "../adapters/a"}, {"path": "../adapters/b"}],
            "merge": {"method": "random", "rank": 64},
            "output": {"path": "../output/cli"},
        },
        name="cli.yaml",
    )
    result = run_cli("plan", "--device", "cpu", str(manifest))

    assert result.returncode == 0, result.stderr
    assert "WARNING lorakit.plan: q_proj: random rank 64 exceeds the 16 components" in result.stderr


def test_all_zero_weights_warn(rank8_sources: Path, caplog: pytest.LogCaptureFixture) -> None:
    body = {
        "version": 1,
        "sources": [{"path": "../adapters/a", "weight": 0}, {"path": "../adapters/b", "weight": 0.0}],
        "merge": {"method": "cat"},
        "output": {"path": "../output/zero"},
    }
    manifest = write_manifest(rank8_sources / "manifests", body, name="zero.yaml")
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        plan = build_plan(load_manifest(manifest), device="cpu")
    for adapter in plan.adapters:
        adapter.close()

    messages = [record.getMessage() for record in caplog.records if record.name == "lorakit.plan"]
    assert "every source has weight 0, so every merged delta is zero; set a nonzero weight on at least one source" in messages
