"""Summarising one PEFT LoRA adapter folder per projection, for ``lorakit inspect``.

For every module the summary reads both factors and computes the Frobenius norm of its delta
ΔW = s · B @ A without forming ΔW: with A flattened to (r, n) and B to (m, r),
‖B A‖²_F = Σ (A Aᵀ) ∘ (Bᵀ B), two r × r Gram matrices computed in float64.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import Adapter, LoraModule, open_adapter
from lorakit.errors import AdapterError
from lorakit.plan import natural_key
from lorakit.serving import serving_report

__all__ = ["AdapterSummary", "ProjectionSummary", "delta_norm", "format_summary", "inspect_adapter"]

logger = logging.getLogger(__name__)

# Config keys that change how an adapter merges, shown in the summary.
MERGE_FLAGS = ("use_rslora", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")


@dataclass(frozen=True)
class ProjectionSummary:
    """The modules of one projection: their ranks, scales, dtypes, shapes and delta norms."""

    projection: str
    kinds: tuple[str, ...]
    modules: int
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    scales: tuple[float, ...]
    dtypes: tuple[str, ...]
    a_shapes: tuple[tuple[int, ...], ...]
    b_shapes: tuple[tuple[int, ...], ...]
    norms: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "projection": self.projection,
            "kind": list(self.kinds),
            "modules": self.modules,
            "ranks": list(self.ranks),
            "alphas": list(self.alphas),
            "scales": list(self.scales),
            "dtypes": list(self.dtypes),
            "lora_A_shapes": [list(shape) for shape in self.a_shapes],
            "lora_B_shapes": [list(shape) for shape in self.b_shapes],
            "delta_norm": {"min": min(self.norms), "median": statistics.median(self.norms), "max": max(self.norms)},
        }


@dataclass(frozen=True)
class AdapterSummary:
    """An adapter's config fields that matter for merging, and one summary per projection."""

    path: Path
    weights_file: str
    config: dict[str, Any]
    projections: tuple[ProjectionSummary, ...]
    other_tensors: tuple[str, ...]
    merge_blocker: str | None

    @property
    def module_count(self) -> int:
        return sum(projection.modules for projection in self.projections)

    def to_dict(self) -> dict[str, Any]:
        ranks = [rank for projection in self.projections for rank in projection.ranks]
        return {
            "path": str(self.path),
            "weights_file": self.weights_file,
            "peft_type": self.config.get("peft_type"),
            "base_model": self.config.get("base_model_name_or_path"),
            "task_type": self.config.get("task_type"),
            "r": self.config.get("r"),
            "lora_alpha": self.config.get("lora_alpha"),
            "target_modules": self.config.get("target_modules"),
            "flags": {key: self.config.get(key) for key in MERGE_FLAGS},
            "mergeable": self.merge_blocker is None,
            "merge_blocker": self.merge_blocker,
            "modules": self.module_count,
            "other_tensors": len(self.other_tensors),
            "projections": [projection.to_dict() for projection in self.projections],
            "serving": serving_report(ranks),
        }


def delta_norm(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """Return ‖s · B @ A‖_F for A of shape (r, ...) and B of shape (m, r, ...), in float64."""
    rank = a.shape[0]
    a = a.reshape(rank, -1).double()
    b = b.reshape(b.shape[0], rank).double()
    squared = ((a @ a.T) * (b.T @ b)).sum().item()
    # Rounding can make a zero delta's squared norm slightly negative.
    return abs(scale) * math.sqrt(max(squared, 0.0))


def _summarise(projection: str, modules: list[LoraModule], norms: list[float]) -> ProjectionSummary:
    def distinct(values: list[Any]) -> tuple[Any, ...]:
        return tuple(dict.fromkeys(values))

    return ProjectionSummary(
        projection=projection,
        kinds=distinct([module.kind for module in modules]),
        modules=len(modules),
        ranks=distinct([module.rank for module in modules]),
        alphas=distinct([module.alpha for module in modules]),
        scales=distinct([module.scale for module in modules]),
        dtypes=distinct([str(module.dtype).removeprefix("torch.") for module in modules]),
        a_shapes=distinct([module.a_shape for module in modules]),
        b_shapes=distinct([module.b_shape for module in modules]),
        norms=tuple(norms),
    )


def inspect_adapter(folder: Path) -> AdapterSummary:
    """Read an adapter folder and summarise it per projection.

    An adapter lorakit cannot merge (DoRA, LoRA bias, modules_to_save) is still summarised: the
    summary names the reason in ``merge_blocker`` and counts the tensors that are not LoRA factors.

    Raises:
        AdapterError: for a folder that is not a readable PEFT LoRA adapter.
        OutputError: when a file cannot be read.
    """
    blocker = None
    try:
        adapter: Adapter = open_adapter(folder, folder.name)
    except AdapterError as error:
        adapter = open_adapter(folder, folder.name, mergeable_only=False)
        blocker = str(error)
    if blocker is None and adapter.saved_tensors:
        blocker = (
            f"{len(adapter.saved_tensors)} full-weight tensor(s) of modules_to_save cannot be merged; a manifest can "
            "copy them unchanged from this adapter with merge.modules_to_save: {source: NAME}"
        )

    by_projection: dict[str, list[LoraModule]] = {}
    for path in sorted(adapter.modules, key=natural_key):
        module = adapter.modules[path]
        by_projection.setdefault(module.projection, []).append(module)

    summaries = []
    try:
        for projection, modules in by_projection.items():
            norms = [delta_norm(adapter.read(module.a_key), adapter.read(module.b_key), module.scale) for module in modules]
            summaries.append(_summarise(projection, modules, norms))
    finally:
        adapter.close()
    return AdapterSummary(
        path=folder,
        weights_file=adapter.weights_path.name,
        config=adapter.config,
        projections=tuple(summaries),
        other_tensors=tuple(adapter.other_keys) + tuple(adapter.saved_tensors),
        merge_blocker=blocker,
    )


def _values(values: tuple[Any, ...], format_value=str) -> str:
    return "/".join(format_value(value) for value in values)


def _number(value: float) -> str:
    return f"{value:g}"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def format_summary(summary: AdapterSummary) -> str:
    """Format a summary as text: the config fields, then one table row per projection."""
    config = summary.config
    lines = [f"{'adapter':<20} {summary.path} ({summary.weights_file}, {summary.module_count} modules)"]
    fields = [("peft_type", "peft_type"), ("task_type", "task_type"), ("base_model", "base_model_name_or_path"), ("r", "r"), ("lora_alpha", "lora_alpha")]
    for label, key in [*fields, *((flag, flag) for flag in MERGE_FLAGS)]:
        value = config.get(key)
        if value is None:
            shown = "-"
        elif isinstance(value, str):
            shown = value
        else:
            shown = json.dumps(value)
        lines.append(f"{label:<20} {shown}")
    if summary.other_tensors:
        lines.append(f"other tensors        {len(summary.other_tensors)}, first {summary.other_tensors[0]!r}")
    lines.append(f"mergeable            {'yes' if summary.merge_blocker is None else 'no: ' + summary.merge_blocker}")

    ranks = [rank for projection in summary.projections for rank in projection.ranks]
    serving = serving_report(ranks)
    if serving["vllm_max_lora_rank"] is not None:
        lines.append(f"vLLM                 --max-lora-rank {serving['vllm_max_lora_rank']} or more")
    elif serving["too_large"]:
        lines.append(f"vLLM                 cannot serve ranks {', '.join(map(str, serving['too_large']))}")
    lines.append("")

    header = ("projection", "modules", "rank", "alpha", "scale", "dtype", "lora_A", "lora_B", "|dW|_F min", "median", "max")
    rows = [
        (
            projection.projection,
            str(projection.modules),
            _values(projection.ranks),
            _values(projection.alphas, _number),
            _values(projection.scales, _number),
            _values(projection.dtypes),
            _values(projection.a_shapes, _shape),
            _values(projection.b_shapes, _shape),
            f"{min(projection.norms):.4g}",
            f"{statistics.median(projection.norms):.4g}",
            f"{max(projection.norms):.4g}",
        )
        for projection in summary.projections
    ]
    widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)
