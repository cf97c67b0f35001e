"""Output ranks against vLLM's --max-lora-rank choices."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import make_adapter, run_cli, tiny_llama, write_manifest

from lorakit.manifest import load_manifest
from lorakit.plan import build_plan
from lorakit.serving import VLLM_MAX_LORA_RANKS, serving_report, vllm_max_lora_rank


@pytest.mark.parametrize(("rank", "choice"), [(1, 1), (2, 8), (8, 8), (48, 64), (300, 320), (512, 512), (513, None)])
def test_vllm_max_lora_rank(rank: int, choice: int | None) -> None:
    assert vllm_max_lora_rank(rank) == choice


def test_serving_report() -> None:
    assert serving_report([64, 48, 64]) == {"max_rank": 64, "vllm_max_lora_rank": 64, "too_large": [], "not_a_choice": [48]}
    assert serving_report([600, 8]) == {"max_rank": 600, "vllm_max_lora_rank": None, "too_large": [600], "not_a_choice": [600]}
    assert VLLM_MAX_LORA_RANKS[-1] == 512


@pytest.fixture(scope="module")
def wide_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two rank-300 adapters on q_proj and v_proj: cat makes rank 600, above vLLM's 512."""
    root = tmp_path_factory.mktemp("wide")
    base = tiny_llama()
    for name, seed in (("a", 1), ("b", 2)):
        make_adapter(base, root / "adapters" / name, seed=seed, r=300, alpha=300, targets=["q_proj", "v_proj"])
    write_manifest(
        root / "manifests",
        {
            "version": 1,
            "sources": [{"path": "../adapters/a"}, {"path": "../adapters/b"}],
            "merge": {"method": "cat", "projections": {"v_proj": {"method": "block", "rank": 300}}},
            "output": {"path": "../output/wide"},
        },
    )
    return root


def test_plan_warns_for_rank_above_vllm(wide_sources: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        plan = build_plan(load_manifest(wide_sources / "manifests" / "merge.yaml"), device="cpu")

    messages = [record.getMessage() for record in caplog.records if record.name == "lorakit.serving"]
    assert len(messages) == 2
    assert "output ranks above 512" in messages[0]
    assert "q_proj (rank 600)" in messages[0]
    assert "v_proj" not in messages[0]
    assert messages[1] == "output rank 300 is not a vLLM --max-lora-rank choice either"
    for adapter in plan.adapters:
        adapter.close()


def test_plan_cli_prints_rank_warning(wide_sources: Path) -> None:
    result = run_cli("plan", "--device", "cpu", str(wide_sources / "manifests" / "merge.yaml"))

    assert result.returncode == 0, result.stderr
    assert "WARNING lorakit.serving: output ranks above 512" in result.stderr
    assert "WARNING" not in result.stdout
