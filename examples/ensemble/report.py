"""Tables and the accuracy-against-rank plot of the ensemble study, built from its results.

``results`` is the mapping that ``run_study.py`` writes to ``results.json``. Its ``models`` maps a
model name to the model's scores (accuracy, mean P(correct), agreement with the output-level
ensemble) and its merge method, rank and seed. Its ``rows`` lists the summary rows in table order.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Sequence

from lorakit.methods import method_names

__all__ = ["markdown_paired", "markdown_sweep", "markdown_table", "mean_std", "plot_sweep", "summary_rows"]

logger = logging.getLogger(__name__)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation (n − 1 in the denominator, 0 for one value)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _model_row(label: str, model: dict | None, missing: str = "not run") -> dict:
    if model is None:
        return {"label": label, "missing": missing}
    return {
        "label": label,
        "rank": model["rank"],
        "accuracy": model["accuracy"],
        "mean_p_correct": model["mean_p_correct"],
        "agreement": model.get("agreement"),
    }


def _spread_row(label: str, models: list[dict], rank: int | None) -> dict:
    """Summarise several models as mean ± sample std of accuracy, and the mean of the other scores."""
    if not models:
        return {"label": label, "missing": "not run"}
    accuracy, spread = mean_std([model["accuracy"] for model in models])
    return {
        "label": label,
        "rank": rank,
        "accuracy": accuracy,
        "accuracy_std": spread,
        "mean_p_correct": mean_std([model["mean_p_correct"] for model in models])[0],
        "agreement": mean_std([model["agreement"] for model in models])[0] if "agreement" in models[0] else None,
    }


def summary_rows(models: dict[str, dict], seeds: Sequence[int], main_rank: int, total_rank: int, random_seeds: int) -> dict:
    """Build the summary rows and the reference accuracies of the plot from the scored models.

    Returns ``{"rows": [...], "references": {...}, "references_p_correct": {...}}``: the reference
    levels of accuracy and of mean P(correct). A model that was not scored yet gets a row
    with ``missing`` set, so a run that stopped early still shows what remains. The best single
    adapter is chosen on the same words it is scored on, so its row is an optimistic bound.
    """
    singles = {f"seed{seed}": models[f"seed{seed}"] for seed in seeds if f"seed{seed}" in models}
    rows = [_model_row("base model, no adapter", models.get("base model"))]
    rows += [_model_row(f"single adapter, seed {seed}", models.get(f"seed{seed}")) for seed in seeds]
    references: dict[str, float] = {}
    references_p_correct: dict[str, float] = {}
    if "base model" in models:
        references["base model"] = models["base model"]["accuracy"]
        references_p_correct["base model"] = models["base model"]["mean_p_correct"]
    if singles:
        best = max(singles, key=lambda name: singles[name]["accuracy"])
        rows.append(_model_row(f"best single ({best}, chosen on these words)", singles[best]))
        rows.append(_spread_row(f"mean of the {len(singles)} singles ± std", list(singles.values()), singles[best]["rank"]))
        references["best single"] = singles[best]["accuracy"]
        references["mean of singles"] = rows[-1]["accuracy"]
        references_p_correct["best single"] = singles[best]["mean_p_correct"]
        references_p_correct["mean of singles"] = rows[-1]["mean_p_correct"]
    ensemble = models.get("output ensemble")
    rows.append(_model_row(f"output-level ensemble: mean P(yes) of the {len(seeds)} adapters", ensemble))
    if ensemble is not None:
        references["output ensemble"] = ensemble["accuracy"]
        references_p_correct["output ensemble"] = ensemble["mean_p_correct"]

    rows.append(_model_row(f"block K = Σ r = {total_rank} (ensemble merge)", models.get(f"block-k{total_rank}")))
    if main_rank != total_rank:
        rows.append(_model_row(f"block K = {main_rank}", models.get(f"block-k{main_rank}")))
    drawn = [model for name, model in models.items() if model.get("method") == "random" and model["rank"] == main_rank]
    rows.append(_spread_row(f"random K = {main_rank}, {random_seeds} seeds, mean ± std", drawn, main_rank))
    rows.append(_model_row("soups (mean of the factors)", models.get("soups")))
    svd_missing = "not run" if "svd" in method_names() else "not available in this lorakit"
    rows.append(_model_row(f"svd K = {main_rank} (weights 1/M)", models.get(f"svd-k{main_rank}"), svd_missing))
    return {"rows": rows, "references": references, "references_p_correct": references_p_correct}


def _percent(value: float, spread: float | None = None) -> str:
    if spread is None:
        return f"{100 * value:.2f}"
    return f"{100 * value:.2f} ± {100 * spread:.2f}"


def markdown_table(results: dict) -> str:
    """Format the summary rows as a Markdown table, accuracies and agreements in percent."""
    lines = [
        "| model | merged rank | accuracy (%) | mean P(correct) | agreement with output ensemble (%) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        rank = "" if row.get("rank") is None else str(row["rank"])
        if row.get("missing"):
            lines.append(f"| {row['label']} | {rank} | {row['missing']} | | |")
            continue
        lines.append(
            f"| {row['label']} | {rank} | {_percent(row['accuracy'], row.get('accuracy_std'))} "
            f"| {row['mean_p_correct']:.4f} | {'' if row['agreement'] is None else _percent(row['agreement'])} |"
        )
    return "\n".join(lines) + "\n"


def _sweep_points(results: dict, method: str, score: str = "accuracy") -> dict[int, list[float]]:
    """Collect ``score`` of ``method`` per merged rank K, one value per random seed."""
    points: dict[int, list[float]] = {}
    for model in results["models"].values():
        if model.get("method") == method:
            points.setdefault(model["rank"], []).append(model[score])
    return dict(sorted(points.items()))


def markdown_sweep(results: dict) -> str:
    """Format block and random accuracy per merged rank K as a Markdown table."""
    block = _sweep_points(results, "block")
    random = _sweep_points(results, "random")
    lines = ["| K | block accuracy (%) | random accuracy (%), mean ± std | random seeds |", "| ---: | ---: | ---: | ---: |"]
    for rank in sorted(set(block) | set(random)):
        block_text = _percent(block[rank][0]) if rank in block else "not run"
        if rank in random:
            random_text, count = _percent(*mean_std(random[rank])), str(len(random[rank]))
        else:
            random_text, count = "not run", "0"
        lines.append(f"| {rank} | {block_text} | {random_text} | {count} |")
    return "\n".join(lines) + "\n"


def markdown_paired(results: dict) -> str:
    """Format the word-by-word comparisons (exact sign test on the discordant words) as a Markdown table."""
    lines = [
        "| A | B | words only A gets right | words only B gets right | two-sided p |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for pair in results["paired"]:
        lines.append(
            f"| {pair['first']} | {pair['second']} | {pair['only_first_correct']} "
            f"| {pair['only_second_correct']} | {pair['p_value']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def _plot_panel(axes, results: dict, score: str, label: str, references: dict[str, float]) -> None:
    """Draw ``score`` against merged rank K for block and random on ``axes``, with reference levels."""
    block = _sweep_points(results, "block", score)
    random = _sweep_points(results, "random", score)
    plotted = [value for values in (*block.values(), *random.values()) for value in values]
    if block:
        axes.plot(list(block), [100 * values[0] for values in block.values()], "o-", label="block (lorakit)")
    if random:
        summaries = [mean_std(values) for values in random.values()]
        means = [100 * mean for mean, _ in summaries]
        spreads = [100 * spread for _, spread in summaries]
        axes.errorbar(list(random), means, yerr=spreads, fmt="s--", capsize=3, label="random (lorakit), mean ± std over seeds")
        for rank, values in random.items():
            axes.scatter([rank] * len(values), [100 * value for value in values], s=8, color="tab:orange", alpha=0.5)

    styles = {
        "output ensemble": ("tab:green", "-"),
        "best single": ("tab:red", ":"),
        "mean of singles": ("tab:gray", ":"),
        "base model": ("black", "-."),
    }
    # A base model far below the adapters would squeeze their differences into a few pixels,
    # so its level then goes into the legend only.
    floor = min(plotted + [value for name, value in references.items() if name != "base model"], default=0.0)
    for name, (color, style) in styles.items():
        if name not in references:
            continue
        if name == "base model" and references[name] < floor - 0.1:
            axes.plot([], [], color=color, linestyle=style, linewidth=1, label=f"base model: {100 * references[name]:.1f}% (off the axis)")
            continue
        axes.axhline(100 * references[name], color=color, linestyle=style, linewidth=1, label=name)

    ranks = sorted(set(block) | set(random))
    axes.set_xscale("log", base=2)
    axes.set_xticks(ranks, [str(rank) for rank in ranks])
    axes.set_xlabel("merged rank K")
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")


def plot_sweep(results: dict, path: Path) -> bool:
    """Plot accuracy, and mean P(correct) when the results have its references, against merged rank K.

    Block and random are drawn with the reference levels (output ensemble, best and mean single,
    base model) as horizontal lines.

    Returns False, after logging why, when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib); no plot written to %s", path)
        return False

    panels = [("accuracy", "held-out accuracy (%)", results["references"])]
    if "references_p_correct" in results:
        panels.append(("mean_p_correct", "mean P(correct answer) (%)", results["references_p_correct"]))
    figure, axes_row = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), dpi=120, squeeze=False)
    for axes, (score, label, references) in zip(axes_row[0], panels):
        _plot_panel(axes, results, score, label, references)
    figure.suptitle(results["title"], fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    logger.info("wrote %s", path)
    return True
