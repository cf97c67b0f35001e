"""Building the output's ``adapter_config.json`` from scratch.

Each merged module m has an output rank K_m and scale s_m, so lora_alpha_m = K_m · s_m with
use_rslora false. The config's ``r`` and ``lora_alpha`` are the most common values; every module
that differs gets a ``rank_pattern`` / ``alpha_pattern`` entry keyed by its fully anchored, escaped
path (``^model\\.layers\\.0\\.mlp\\.up_proj$``), which PEFT's pattern matching resolves to exactly
that module.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable, Sequence

from lorakit.adapter import Adapter

__all__ = ["build_adapter_config", "output_alpha"]

# Fields copied from the sources when every source has the same value.
_COMMON_FIELDS = (
    "base_model_name_or_path",
    "revision",
    "task_type",
    "fan_in_fan_out",
    "lora_dropout",
    "bias",
    "init_lora_weights",
)


def output_alpha(rank: int, scale: float) -> int | float:
    """Return lora_alpha = rank · scale, as an int when it is whole (never by integer division)."""
    alpha = rank * scale
    return int(alpha) if float(alpha).is_integer() else alpha


def _most_common(values: Sequence[Any]) -> Any:
    # Counter keeps first-seen order among equal counts, so ties go to the earliest module.
    return Counter(values).most_common(1)[0][0]


def _anchored(path: str) -> str:
    return f"^{re.escape(path)}$"


def _target_modules(adapters: Sequence[Adapter], projections: list[str], paths: list[str]) -> list[str]:
    """Projection names when they select exactly what the sources adapted, else every module path."""
    for adapter in adapters:
        targets = adapter.config.get("target_modules")
        if not isinstance(targets, list) or any("." in str(target) for target in targets):
            return paths
        if adapter.config.get("layers_to_transform") is not None or adapter.config.get("exclude_modules"):
            return paths
    return projections


def build_adapter_config(
    adapters: Sequence[Adapter],
    modules: Iterable[tuple[str, str, int, float]],
    modules_to_save: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Build the output config.

    Args:
        adapters: the sources, for the fields they share.
        modules: (module path, projection, output rank, output scale) of every merged module.
        modules_to_save: the module names whose full weights the output holds, or None.
    """
    modules = list(modules)
    ranks = [rank for _, _, rank, _ in modules]
    alphas = [output_alpha(rank, scale) for _, _, rank, scale in modules]
    rank = _most_common(ranks)
    alpha = _most_common(alphas)

    config: dict[str, Any] = {"peft_type": "LORA"}
    for field in _COMMON_FIELDS:
        values = [adapter.config.get(field) for adapter in adapters]
        if all(value == values[0] for value in values) and values[0] is not None:
            config[field] = values[0]
    projections = sorted({projection for _, projection, _, _ in modules})
    config.update(
        {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": _target_modules(adapters, projections, [path for path, _, _, _ in modules]),
            "rank_pattern": {_anchored(path): r for (path, _, r, _) in modules if r != rank},
            "alpha_pattern": {_anchored(path): a for (path, _, _, _), a in zip(modules, alphas) if a != alpha},
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": list(modules_to_save) if modules_to_save else None,
            "inference_mode": True,
        }
    )
    return config
