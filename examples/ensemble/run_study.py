"""Test the LoRA ensemble-merge claim at small scale on the word-sentiment adapters.

The claim: adapters trained independently are particles of one mean-field model, so a block merge
that keeps all K = Σ r components with a 1/M scale is an ensemble that beats the best single
adapter. This script trains (or reuses) one adapter per seed, merges them with lorakit, scores
every model on the same held-out words with the same prompt and scoring, and writes the results:

    WORK/results.json   every model's scores, the summary rows, settings and timings
    WORK/results.md     the summary table and the accuracy-per-rank table
    PLOT                accuracy against merged rank K for block and random (PNG)

WORK is ``CACHE/<settings>/``, for example ``examples/ensemble/cache/steps150-bs16-lr0.0003-wd0-lambda0/``.
Adapters that are missing are trained into ``WORK/adapters/`` in this process, with the training
code of ``examples/train_adapters.py``. P(yes) of every scored model is cached in ``CACHE/p_yes/``,
keyed by the adapter's files and the word list, so a re-run scores only what changed.

Example (the run reported in docs/ensemble-results.md):
    python examples/ensemble/run_study.py --plot docs/ensemble-results.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import evaluate  # noqa: E402
import sentiment_task  # noqa: E402
import train_adapters  # noqa: E402
from merges import MergeSpec, run_merge, study_merges  # noqa: E402
from report import markdown_paired, markdown_sweep, markdown_table, plot_sweep, summary_rows  # noqa: E402
from scoring import ProbabilityCache, Scorer, agreement, output_ensemble, paired_comparison  # noqa: E402
from seed_adapters import settings_tag, train_missing  # noqa: E402

from lorakit.methods import method_names  # noqa: E402

logger = logging.getLogger("run_study")

DEFAULT_SEEDS = [100, 200, 300, 400, 500, 600, 700, 800]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    training = train_adapters.parse_args([])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS,
                        help=f"one adapter per seed (default: {' '.join(map(str, DEFAULT_SEEDS))})")
    parser.add_argument("--committed", type=Path, default=HERE.parent / "adapters",
                        help="folder with committed adapters seed{N}/, reused when their training settings match "
                             "(default: examples/adapters)")
    parser.add_argument("--cache", type=Path, default=HERE / "cache",
                        help="folder for trained adapters, manifests, merged adapters, cached P(yes) and results; "
                             "git ignores the default (default: examples/ensemble/cache)")

    parser.add_argument("--steps", type=int, default=training.steps,
                        help=f"optimizer steps per adapter (default: {training.steps})")
    parser.add_argument("--batch-size", type=int, default=training.batch_size,
                        help=f"words per optimizer step (default: {training.batch_size})")
    parser.add_argument("--lr", type=float, default=training.lr, help=f"AdamW learning rate (default: {training.lr:g})")
    parser.add_argument("--weight-decay", type=float, default=training.weight_decay,
                        help=f"AdamW weight decay (default: {training.weight_decay:g})")
    parser.add_argument("--noise-temperature", type=float, default=training.noise_temperature, metavar="LAMBDA",
                        help="Langevin temperature: after each optimizer step add sqrt(2 * LAMBDA * lr) * N(0, 1) "
                             "to every LoRA parameter; 0 is plain AdamW, as the committed adapters were trained "
                             f"(default: {training.noise_temperature:g})")

    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64, 128],
                        help="merged ranks K of the block and random sweep, each at most Σ r (default: 8 16 32 64 128)")
    parser.add_argument("--main-rank", type=int, default=64,
                        help="K of the block, random and svd rows of the summary table (default: 64)")
    parser.add_argument("--random-seeds", type=int, nargs="+", default=[1, 2, 3, 4],
                        help="seeds of the random merge at --main-rank (default: 1 2 3 4)")
    parser.add_argument("--sweep-random-seeds", type=int, default=None, metavar="N",
                        help="use only the first N of --random-seeds at the other ranks of the sweep (default: all)")
    parser.add_argument("--no-sweep", action="store_true", help="merge only the summary-table rows, not every K of --ranks")

    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="score a fixed random subset of N held-out words (the subset of examples/evaluate.py, "
                             "seed 0) instead of the whole held-out split (default: the whole split)")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="words per forward pass when scoring (default: 64)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; 1 avoids threads waiting on each other when other jobs share "
                             "the cores (default: torch's own choice)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG file for the accuracy-per-rank plot (default: WORK/accuracy_vs_rank.png)")

    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
        parser.error(f"--seeds needs at least two distinct seeds, got {args.seeds}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be positive, got {args.limit}")
    if args.sweep_random_seeds is not None and args.sweep_random_seeds < 1:
        parser.error(f"--sweep-random-seeds must be positive, got {args.sweep_random_seeds}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    if min(args.ranks + [args.main_rank]) < 1:
        parser.error("--ranks and --main-rank must be positive")
    return args


def training_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Build the namespace ``train_adapters.train_one`` expects, validated by its own parser."""
    return train_adapters.parse_args([
        "--seeds", *map(str, args.seeds),
        "--steps", str(args.steps),
        "--batch-size", str(args.batch_size),
        "--lr", repr(args.lr),
        "--weight-decay", repr(args.weight_decay),
        "--noise-temperature", repr(args.noise_temperature),
    ])


def adapter_rank(folder: Path) -> int:
    """Return the rank r of an adapter from its adapter_config.json.

    NOTE: Σ r is taken from the global r; an adapter with a rank_pattern is rejected, not summed per module.
    """
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("rank_pattern"):
        raise ValueError(f"{folder}: adapters with a rank_pattern are not supported by this study")
    return int(config["r"])


class Study:
    """The models scored so far and their P(yes); ``write`` rewrites the results after each merge."""

    def __init__(self, args: argparse.Namespace, work: Path, scorer: Scorer, seeds: list[int], total_rank: int):
        self.args = args
        self.work = work
        self.scorer = scorer
        self.seeds = seeds
        self.total_rank = total_rank
        self.models: dict[str, dict] = {}
        self.p_yes: dict[str, torch.Tensor] = {}
        self.timings: dict[str, float] = {}

    def score_all(self, folders: dict[int, Path], specs: list[MergeSpec], plot: Path) -> None:
        """Score the base model, every single adapter, the output-level ensemble and every merge of ``specs``.

        The results are rewritten after the singles and after each merge, so a run that stops early
        still leaves the rows it finished.
        """
        began = time.monotonic()
        self.add("base model", None, method="base", rank=None, seed=None)
        for seed, folder in folders.items():
            self.add(f"seed{seed}", folder, method="single", rank=adapter_rank(folder), seed=seed)
        self.add_output_ensemble()
        self.timings["singles"] = time.monotonic() - began
        self.write(plot)

        for spec in specs:
            for merged in run_merge(spec, list(folders.values()), self.work):
                name = spec.name if merged.seed is None else f"{spec.name}-seed{merged.seed}"
                # soups takes no rank, and its output keeps the sources' common rank.
                rank = spec.rank if spec.rank is not None else adapter_rank(next(iter(folders.values())))
                self.add(name, merged.path, method=spec.method, rank=rank, seed=merged.seed)
            self.timings["merges"] = time.monotonic() - began - self.timings["singles"]
            self.write(plot)

    def add(self, name: str, adapter: Path | None, **fields) -> None:
        """Score one model (base model when ``adapter`` is None) and record it with ``fields``."""
        self.p_yes[name] = self.scorer.p_yes(name, adapter)
        self.models[name] = {**fields, "path": str(adapter) if adapter is not None else None, **self.scorer.score(self.p_yes[name])}

    def add_output_ensemble(self) -> None:
        """Record the output-level ensemble: the mean P(yes) of the single adapters."""
        singles = [self.p_yes[f"seed{seed}"] for seed in self.seeds]
        self.p_yes["output ensemble"] = output_ensemble(singles)
        self.models["output ensemble"] = {
            "method": "output ensemble", "rank": None, "seed": None, "path": None,
            **self.scorer.score(self.p_yes["output ensemble"]),
        }

    def scored_models(self) -> dict[str, dict]:
        """Return every model's record with its agreement with the output-level ensemble."""
        reference = self.p_yes.get("output ensemble")
        if reference is None:
            return self.models
        return {name: {**model, "agreement": agreement(self.p_yes[name], reference)} for name, model in self.models.items()}

    def paired(self) -> list[dict]:
        """Compare the ensemble merge and the other merges with the best single adapter, word by word."""
        singles = [f"seed{seed}" for seed in self.seeds if f"seed{seed}" in self.models]
        if not singles:
            return []
        best = max(singles, key=lambda name: self.models[name]["accuracy"])
        block_full = f"block-k{self.total_rank}"
        main_rank = self.args.main_rank
        pairs = [(name, best) for name in ("output ensemble", block_full, f"block-k{main_rank}", "soups", f"svd-k{main_rank}")]
        pairs.append((block_full, "output ensemble"))

        comparisons = []
        for first, second in pairs:
            if first in self.p_yes and second in self.p_yes:
                comparison = paired_comparison(self.p_yes[first], self.p_yes[second], self.scorer.labels)
                comparisons.append({"first": first, "second": second, **comparison})
        return comparisons

    def results(self) -> dict:
        words = self.scorer.words
        models = self.scored_models()
        held_out = len(sentiment_task.build_splits().held_out)
        return {
            "title": (
                f"SmolLM2-135M-Instruct, {len(self.seeds)} LoRA adapters (r={self.total_rank // len(self.seeds)}), "
                f"λ={self.args.noise_temperature:g}, {len(words)} held-out words"
            ),
            "command": [os.path.relpath(sys.argv[0])] + sys.argv[1:],
            "settings": vars(training_settings(self.args)) | {"out": None},
            "seeds": self.seeds,
            "random_seeds": self.args.random_seeds,
            "evaluated_words": len(words),
            "positive_words": sum(item.label for item in words),
            "held_out_words": held_out,
            "subset_seed": evaluate.SUBSET_SEED if len(words) < held_out else None,
            "svd_available": "svd" in method_names(),
            "timings_s": {name: round(value, 1) for name, value in self.timings.items()},
            "models": models,
            "paired": self.paired(),
            **summary_rows(models, self.seeds, self.args.main_rank, self.total_rank, len(self.args.random_seeds)),
        }

    def write(self, plot: Path) -> None:
        results = self.results()
        (self.work / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        (self.work / "results.md").write_text(
            f"{results['title']}\n\n{markdown_table(results)}\n{markdown_sweep(results)}\n{markdown_paired(results)}"
        )
        if any(model["method"] in ("block", "random") for model in self.models.values()):
            plot_sweep(results, plot)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = training_settings(args)
    work = args.cache / settings_tag(settings)
    work.mkdir(parents=True, exist_ok=True)
    plot = args.plot or work / "accuracy_vs_rank.png"
    began = time.monotonic()

    splits = sentiment_task.build_splits()
    words = evaluate.select_words(splits.held_out, args.limit)
    logger.info("scoring %d of %d held-out words; work folder %s", len(words), len(splits.held_out), work)
    base_model, tokenizer = sentiment_task.load_base_model()
    for parameter in base_model.parameters():
        parameter.requires_grad_(False)

    folders = train_missing(args.seeds, settings, args.committed, work / "adapters", base_model, tokenizer, splits.train)
    ranks = [adapter_rank(folder) for folder in folders.values()]
    total_rank = sum(ranks)
    specs = study_merges(
        len(folders), total_rank, [] if args.no_sweep else args.ranks, args.random_seeds, args.main_rank, args.sweep_random_seeds
    )
    scorer = Scorer(base_model, tokenizer, words, ProbabilityCache(args.cache / "p_yes", words), args.eval_batch_size)
    study = Study(args, work, scorer, list(folders), total_rank)
    study.timings["train"] = time.monotonic() - began
    study.score_all(folders, specs, plot)
    print((work / "results.md").read_text())


if __name__ == "__main__":
    main()
