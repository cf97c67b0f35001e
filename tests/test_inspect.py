"""lorakit inspect: per-projection summaries, ΔW norms against PEFT, and adapters lorakit cannot merge."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, peft_deltas, run_cli, tiny_llama

from lorakit.inspection import delta_norm, format_summary, inspect_adapter


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def test_delta_norm_matches_dense_product() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, 2, 2, generator=generator)
    b = torch.randn(7, 5, 1, 1, generator=generator)

    dense = 0.75 * (b.double().reshape(7, 5) @ a.double().reshape(5, 12))

    assert delta_norm(a, b, 0.75) == pytest.approx(torch.linalg.norm(dense).item(), rel=1e-12)
    assert delta_norm(a, torch.zeros_like(b), 2.0) == 0.0


def test_inspect_norms_match_peft(base, tmp_path: Path) -> None:
    folder = make_adapter(
        base,
        tmp_path / "patterned",
        seed=3,
        r=4,
        alpha=8,
        targets=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 6},
        alpha_pattern={"down_proj": 3},
        use_rslora=True,
    )
    expected: dict[str, list[float]] = defaultdict(list)
    for path, delta in sorted(peft_deltas(base, folder).items()):
        expected[path.rsplit(".", 1)[-1]].append(torch.linalg.norm(delta.double()).item())

    summary = inspect_adapter(folder)

    by_name = {projection.projection: projection for projection in summary.projections}
    assert set(by_name) == set(expected)
    for name, norms in expected.items():
        assert sorted(by_name[name].norms) == pytest.approx(sorted(norms), rel=1e-5)
    assert by_name["q_proj"].ranks == (4, 6)
    assert by_name["down_proj"].alphas == (3.0,)
    assert by_name["down_proj"].scales == (pytest.approx(3 / 2),)
    assert by_name["embed_tokens"].kinds == ("embedding",)


def test_inspect_text_table(base, tmp_path: Path) -> None:
    folder = make_adapter(base, tmp_path / "plain", seed=4, r=8, alpha=16, targets=["q_proj", "v_proj"], dtype=torch.bfloat16)

    summary = inspect_adapter(folder)
    text = format_summary(summary)

    assert "use_rslora           false" in text
    assert "rank_pattern         {}" in text
    assert summary.merge_blocker is None
    assert "mergeable            yes" in text
    assert "vLLM                 --max-lora-rank 8 or more" in text
    row = next(line for line in text.splitlines() if line.startswith("q_proj"))
    norms = summary.projections[0].norms
    assert row.split() == ["q_proj", "2", "8", "16", "2", "bfloat16", "8x32", "32x8", f"{min(norms):.4g}", f"{statistics.median(norms):.4g}", f"{max(norms):.4g}"]


def test_inspect_dora_adapter_names_blocker(base, tmp_path: Path) -> None:
    folder = make_adapter(base, tmp_path / "dora", seed=5, targets=["q_proj"], use_dora=True)

    summary = inspect_adapter(folder)

    assert summary.config["use_dora"] is True
    assert summary.merge_blocker is not None and "use_dora is true" in summary.merge_blocker
    assert summary.module_count == 2
    assert len(summary.other_tensors) == 2
    assert "mergeable            no: " in format_summary(summary)


def test_inspect_modules_to_save_counts_other_tensors(base, tmp_path: Path) -> None:
    folder = make_adapter(base, tmp_path / "saved", seed=6, targets=["v_proj"], modules_to_save=["lm_head"])

    summary = inspect_adapter(folder)

    assert summary.config["modules_to_save"] == ["lm_head"]
    assert summary.merge_blocker is not None and "modules_to_save" in summary.merge_blocker
    assert summary.other_tensors


def test_inspect_cli_json(base, tmp_path: Path) -> None:
    folder = make_adapter(base, tmp_path / "json", seed=7, r=4, alpha=8)

    result = run_cli("inspect", "--json", str(folder))

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mergeable"] is True
    assert report["modules"] == 10
    assert report["flags"]["use_rslora"] is False
    assert report["serving"]["vllm_max_lora_rank"] == 8
    assert {item["projection"] for item in report["projections"]} == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    for item in report["projections"]:
        assert item["delta_norm"]["min"] <= item["delta_norm"]["median"] <= item["delta_norm"]["max"]


def test_inspect_cli_missing_folder(tmp_path: Path) -> None:
    result = run_cli("inspect", str(tmp_path / "absent"))

    assert result.returncode == 1
    assert "adapter folder not found" in result.stderr
    assert "Traceback" not in result.stderr
