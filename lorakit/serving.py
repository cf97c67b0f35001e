"""Rank limits of LoRA servers, checked against the output ranks of a merge.

vLLM serves an adapter only if its rank is at most ``--max-lora-rank``, and that option accepts a
fixed set of values. ``VLLM_MAX_LORA_RANKS`` is ``MaxLoRARanks`` from ``vllm/config/lora.py`` in
vLLM v0.14.0 (the same list is in that file at commit a78dc92 of vLLM's main branch). A rank
between two choices is served with the next larger choice, at the memory cost of that choice.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

__all__ = ["VLLM_MAX_LORA_RANKS", "serving_report", "vllm_max_lora_rank", "warn_unservable_ranks"]

logger = logging.getLogger(__name__)

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int | None:
    """Return the smallest ``--max-lora-rank`` choice of vLLM that serves ``rank``, or None above the largest."""
    return next((choice for choice in VLLM_MAX_LORA_RANKS if choice >= rank), None)


def serving_report(ranks: Iterable[int]) -> dict[str, Any]:
    """Describe how vLLM can serve an adapter whose modules have ``ranks``.

    Returns:
        A dict with four keys. ``max_rank`` is the largest rank. ``vllm_max_lora_rank`` is the
        smallest choice that serves every module, or None when a rank exceeds the largest choice.
        ``too_large`` lists the ranks above the largest choice. ``not_a_choice`` lists the ranks
        that are not a choice themselves, which the next larger choice serves.
    """
    distinct = sorted(set(ranks))
    largest = VLLM_MAX_LORA_RANKS[-1]
    too_large = [rank for rank in distinct if rank > largest]
    return {
        "max_rank": distinct[-1] if distinct else None,
        "vllm_max_lora_rank": None if too_large or not distinct else vllm_max_lora_rank(distinct[-1]),
        "too_large": too_large,
        "not_a_choice": [rank for rank in distinct if rank not in VLLM_MAX_LORA_RANKS],
    }


def _not_choices(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]} is not a vLLM --max-lora-rank choice"
    return f"ranks {', '.join(map(str, ranks))} are not vLLM --max-lora-rank choices"


def warn_unservable_ranks(ranks_by_projection: Iterable[tuple[str, int]]) -> None:
    """Log a warning for every projection whose output rank exceeds vLLM's largest ``--max-lora-rank``.

    Args:
        ranks_by_projection: (projection, output rank) of every module group.
    """
    pairs = list(ranks_by_projection)
    report = serving_report(rank for _, rank in pairs)
    largest = VLLM_MAX_LORA_RANKS[-1]
    if report["too_large"]:
        over = sorted({f"{projection} (rank {rank})" for projection, rank in pairs if rank > largest})
        logger.warning(
            "output ranks above %d, the largest --max-lora-rank vLLM accepts (choices: %s): %s; vLLM will reject "
            "this adapter, so lower the rank of those projections to serve it there",
            largest,
            ", ".join(map(str, VLLM_MAX_LORA_RANKS)),
            ", ".join(over),
        )
        other = [rank for rank in report["not_a_choice"] if rank <= largest]
        if other:
            logger.warning("output %s either", _not_choices(other))
    elif report["max_rank"] is not None:
        note = f"; output {_not_choices(report['not_a_choice'])}, so the next larger choice serves it" if report["not_a_choice"] else ""
        logger.info("vLLM serves this output with --max-lora-rank %d or more%s", report["vllm_max_lora_rank"], note)
