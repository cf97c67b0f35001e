"""Tests of the ensemble study's own code, on tiny PEFT adapters; no model download, no training.

The README's test command runs them with the rest of the suite; alone, run
``python -m pytest examples/ensemble/test_ensemble.py -q`` from the repository root.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests"))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from conftest import make_adapter, peft_deltas, tiny_llama  # noqa: E402
import run_study  # noqa: E402
import sentiment_task  # noqa: E402
from deltas import adapter_deltas, compare_with_mean  # noqa: E402
from merges import MergeSpec, run_merge, study_merges  # noqa: E402
from report import markdown_paired, markdown_sweep, markdown_table, mean_std, plot_sweep, summary_rows  # noqa: E402
from scoring import ProbabilityCache, agreement, output_ensemble, paired_comparison  # noqa: E402
from seed_adapters import find_adapter, settings_tag  # noqa: E402
from sentiment_task import LabeledWord  # noqa: E402

from lorakit.hashcache import CACHE_ENV  # noqa: E402
from lorakit.methods import method_names  # noqa: E402

WORDS = [LabeledWord("good", 1, 1.9), LabeledWord("bad", 0, -2.5), LabeledWord("fine", 1, 0.8)]


@pytest.fixture(autouse=True)
def hash_cache_folder(tmp_path, monkeypatch) -> None:
    """Keep lorakit's source hash cache out of the user's home."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "hash-cache"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    base = tiny_llama()
    folder = tmp_path_factory.mktemp("sources")
    return [make_adapter(base, folder / f"seed{seed}", seed, r=4, alpha=8) for seed in (1, 2, 3)]


def test_study_merges_headline_first():
    specs = study_merges(8, 128, [8, 64, 128], [1, 2], 64)
    names = [spec.name for spec in specs]
    assert names[:4] == ["block-k128", "block-k64", "random-k64", "soups"]
    assert ("svd-k64" in names) == ("svd" in method_names())
    assert names[-3:] == ["block-k8", "random-k8", "random-k128"]
    assert len(names) == len(set(names))


def test_study_merges_svd_weight_is_one_over_m():
    if "svd" not in method_names():
        pytest.skip("svd is not registered in this lorakit")
    svd = next(spec for spec in study_merges(8, 128, [], [1], 64) if spec.method == "svd")
    assert svd.weight == 1 / 8


def test_study_merges_sweep_uses_first_seeds():
    specs = {spec.name: spec for spec in study_merges(8, 128, [8, 64], [1, 2, 3, 4], 64, sweep_random_seeds=2)}
    assert specs["random-k64"].seeds == (1, 2, 3, 4)
    assert specs["random-k8"].seeds == (1, 2)


def test_study_merges_rank_above_total_rejected():
    with pytest.raises(ValueError, match="at most Σ r = 128"):
        study_merges(8, 128, [256], [1], 64)


def test_run_merge_block_full_rank_is_mean_delta(sources, tmp_path):
    base = tiny_llama()
    [merged] = run_merge(MergeSpec("block-k12", "block", 12), sources, tmp_path)
    assert merged.seed is None
    assert (tmp_path / "manifests" / "block-k12.yaml").is_file()

    source_deltas = [peft_deltas(base, source) for source in sources]
    merged_deltas = peft_deltas(base, merged.path)
    assert set(merged_deltas) == set(source_deltas[0])
    for path, delta in merged_deltas.items():
        mean = torch.stack([deltas[path] for deltas in source_deltas]).mean(dim=0)
        torch.testing.assert_close(delta, mean, rtol=1e-5, atol=1e-6)


def test_adapter_deltas_match_peft(sources):
    from lorakit.adapter import open_adapter

    adapter = open_adapter(sources[0], "seed1")
    deltas = adapter_deltas(adapter)
    adapter.close()
    expected = peft_deltas(tiny_llama(), sources[0])
    assert set(deltas) == set(expected)
    for path, delta in deltas.items():
        torch.testing.assert_close(delta.float(), expected[path], rtol=1e-5, atol=1e-6)


def test_compare_with_mean_block_and_single(sources, tmp_path):
    [block] = run_merge(MergeSpec("block-k12", "block", 12), sources, tmp_path)
    [half] = run_merge(MergeSpec("block-k6", "block", 6), sources, tmp_path)

    figures = compare_with_mean(sources, [block.path, half.path, sources[0]])

    assert figures[str(block.path)]["relative_error"] < 1e-6
    assert figures[str(block.path)]["relative_norm"] == pytest.approx(1.0, abs=1e-6)
    assert figures[str(half.path)]["relative_error"] > 0.1
    # One source against the mean of three independent ones: far from it, and larger.
    assert figures[str(sources[0])]["relative_error"] > 0.5
    assert figures[str(sources[0])]["relative_norm"] > 1.0


def test_run_merge_random_one_folder_per_seed(sources, tmp_path):
    merged = run_merge(MergeSpec("random-k4", "random", 4, seeds=(7, 8)), sources, tmp_path)
    assert [item.seed for item in merged] == [7, 8]
    for item in merged:
        assert json.loads((item.path / "adapter_config.json").read_text())["r"] == 4


def test_run_merge_rerun_byte_identical(sources, tmp_path):
    [first] = run_merge(MergeSpec("soups", "soups", None), sources, tmp_path)
    before = (first.path / "adapter_model.safetensors").read_bytes()
    [second] = run_merge(MergeSpec("soups", "soups", None), sources, tmp_path)
    assert (second.path / "adapter_model.safetensors").read_bytes() == before


def test_cache_key_follows_adapter_and_words(sources, tmp_path):
    cache = ProbabilityCache(tmp_path / "p_yes", WORDS)
    keys = {cache.key(source) for source in sources}
    assert len(keys) == len(sources)
    assert cache.key(None) not in keys
    other_words = ProbabilityCache(tmp_path / "p_yes", WORDS[:2])
    assert other_words.key(sources[0]) != cache.key(sources[0])


def test_cache_store_load_round_trip(tmp_path):
    cache = ProbabilityCache(tmp_path, WORDS)
    p_yes = torch.tensor([0.9, 0.25, 0.5])
    assert cache.load("abc") is None
    cache.store("abc", "seed1", None, p_yes, 1.0)
    torch.testing.assert_close(cache.load("abc"), p_yes)
    assert not list(tmp_path.glob(".*.tmp"))


def test_output_ensemble_and_agreement():
    first = torch.tensor([0.9, 0.2, 0.6])
    second = torch.tensor([0.7, 0.4, 0.2])
    ensemble = output_ensemble([first, second])
    torch.testing.assert_close(ensemble, torch.tensor([0.8, 0.3, 0.4]))
    assert agreement(first, ensemble) == pytest.approx(2 / 3)
    assert agreement(second, ensemble) == 1.0


def test_mean_std_sample_std():
    mean, spread = mean_std([0.5, 0.7])
    assert mean == pytest.approx(0.6)
    assert spread == pytest.approx(0.2 / 2**0.5)
    assert mean_std([0.4]) == (0.4, 0.0)


def _model(method: str, accuracy: float, rank: int | None = None, seed: int | None = None) -> dict:
    return {"method": method, "rank": rank, "seed": seed, "accuracy": accuracy, "mean_p_correct": accuracy - 0.1, "agreement": 0.9}


def _results(models: dict) -> dict:
    return {"title": "test", "models": models, **summary_rows(models, [1, 2], 8, 8, 2)}


def test_summary_rows_best_mean_and_missing():
    models = {
        "base model": _model("base", 0.5),
        "seed1": _model("single", 0.6, 4, 1),
        "seed2": _model("single", 0.8, 4, 2),
        "output ensemble": _model("output ensemble", 0.85),
        "block-k8": _model("block", 0.84, 8),
    }
    results = _results(models)
    rows = {row["label"]: row for row in results["rows"]}
    assert rows["best single (seed2, chosen on these words)"]["accuracy"] == 0.8
    mean_row = rows["mean of the 2 singles ± std"]
    assert mean_row["accuracy"] == pytest.approx(0.7)
    assert mean_row["accuracy_std"] == pytest.approx(0.2 / 2**0.5)
    assert rows["soups (mean of the factors)"]["missing"] == "not run"
    assert rows["random K = 8, 2 seeds, mean ± std"]["missing"] == "not run"
    assert results["references"] == {"base model": 0.5, "best single": 0.8, "mean of singles": pytest.approx(0.7), "output ensemble": 0.85}
    assert results["references_p_correct"] == {
        "base model": pytest.approx(0.4),
        "best single": pytest.approx(0.7),
        "mean of singles": pytest.approx(0.6),
        "output ensemble": pytest.approx(0.75),
    }

    table = markdown_table(results)
    assert "| block K = Σ r = 8 (ensemble merge) | 8 | 84.00 | 0.7400 | 90.00 |" in table
    assert "| soups (mean of the factors) |  | not run | | |" in table


def test_markdown_sweep_random_mean_and_std():
    models = {
        "block-k4": _model("block", 0.7, 4),
        "random-k4-seed1": _model("random", 0.6, 4, 1),
        "random-k4-seed2": _model("random", 0.8, 4, 2),
        "random-k8-seed1": _model("random", 0.75, 8, 1),
    }
    sweep = markdown_sweep({"models": models})
    assert "| 4 | 70.00 | 70.00 ± 14.14 | 2 |" in sweep
    assert "| 8 | not run | 75.00 ± 0.00 | 1 |" in sweep


def test_plot_sweep_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    models = {"block-k4": _model("block", 0.7, 4), "random-k4-seed1": _model("random", 0.6, 4, 1)}
    path = tmp_path / "plot.png"
    assert plot_sweep({"title": "test", "models": models, "references": {"best single": 0.65}}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    both = tmp_path / "both.png"
    results = {"title": "test", "models": models, "references": {"base model": 0.1}, "references_p_correct": {"base model": 0.1}}
    assert plot_sweep(results, both)
    assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_find_adapter_matches_training_settings(tmp_path):
    expected = {"steps": 150, "batch_size": 16, "lr": 3e-4, "weight_decay": 0.0, "noise_temperature": 0.0, "train_words": 10}
    committed, cache = tmp_path / "committed", tmp_path / "cache"
    for folder, lam in ((committed, 0.5), (cache, 0.0)):
        (folder / "seed5").mkdir(parents=True)
        (folder / "seed5" / "adapter_model.safetensors").write_bytes(b"")
        (folder / "seed5" / "training.json").write_text(json.dumps({**expected, "noise_temperature": lam}))
    assert find_adapter(5, [committed, cache], expected) == cache / "seed5"
    assert find_adapter(6, [committed, cache], expected) is None


def test_settings_tag_names_every_setting():
    from argparse import Namespace

    settings = Namespace(steps=150, batch_size=16, lr=3e-4, weight_decay=0.0, noise_temperature=0.01)
    assert settings_tag(settings) == "steps150-bs16-lr0.0003-wd0-lambda0.01"


def test_paired_comparison_sign_test():
    labels = [1, 1, 1, 0]
    first = torch.tensor([0.9, 0.9, 0.9, 0.1])
    second = torch.tensor([0.1, 0.1, 0.9, 0.1])
    comparison = paired_comparison(first, second, labels)
    assert comparison["only_first_correct"] == 2
    assert comparison["only_second_correct"] == 0
    assert comparison["p_value"] == pytest.approx(0.5)
    assert paired_comparison(first, first, labels)["p_value"] == 1.0


def test_markdown_paired_row():
    pair = {"first": "block-k8", "second": "seed2", "only_first_correct": 5, "only_second_correct": 1, "p_value": 0.21875}
    assert "| block-k8 | seed2 | 5 | 1 | 0.219 |" in markdown_paired({"paired": [pair]})


class _NameSeededScorer:
    """A stand-in for ``scoring.Scorer`` without a language model: P(yes) is drawn from the adapter's cache key."""

    def __init__(self, tmp_path: Path):
        self.words = WORDS
        self.labels = [item.label for item in WORDS]
        self.cache = ProbabilityCache(tmp_path / "p_yes", WORDS)

    def p_yes(self, name: str, adapter: Path | None) -> torch.Tensor:
        seed = int(self.cache.key(adapter)[:8], 16)
        return torch.rand(len(self.words), generator=torch.Generator().manual_seed(seed))

    def score(self, p_yes: torch.Tensor) -> dict:
        return sentiment_task.score(p_yes, self.labels)


def test_study_score_all_writes_every_row(sources, tmp_path):
    # The results record the size of the held-out split, which comes from the VADER lexicon.
    pytest.importorskip("vaderSentiment", reason="needs the examples extra: pip install -e '.[examples]'")
    args = run_study.parse_args(["--seeds", "1", "2", "3", "--cache", str(tmp_path), "--main-rank", "8", "--random-seeds", "5", "6"])
    folders = dict(zip(args.seeds, sources))
    specs = study_merges(3, 12, [4, 8, 12], args.random_seeds, args.main_rank)
    study = run_study.Study(args, tmp_path, _NameSeededScorer(tmp_path), args.seeds, 12)
    plot = tmp_path / "plot.png"
    study.score_all(folders, specs, plot)

    results = json.loads((tmp_path / "results.json").read_text())
    assert {"base model", "seed1", "output ensemble", "block-k12", "block-k8", "random-k8-seed5", "soups", "random-k12-seed6"} <= set(results["models"])
    assert results["models"]["soups"]["rank"] == 4
    assert results["models"]["output ensemble"]["agreement"] == 1.0
    missing = [row["label"] for row in results["rows"] if row.get("missing")]
    assert missing == ([] if "svd" in method_names() else ["svd K = 8 (weights 1/M)"])
    assert [pair["first"] for pair in results["paired"]][:2] == ["output ensemble", "block-k12"]
    table = (tmp_path / "results.md").read_text()
    assert "| 4 |" in table
    assert "| 12 |" in table
    if _has_matplotlib():
        assert plot.is_file()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
