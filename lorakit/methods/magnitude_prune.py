"""magnitude_prune: keep each delta's largest entries, sum, truncate to rank K."""

from __future__ import annotations

from typing import Sequence

import torch

from lorakit.methods.base import GroupInput
from lorakit.methods.dense import DENSITY, DenseMethod, keep_largest, weighted_deltas

__all__ = ["MagnitudePrune"]


class MagnitudePrune(DenseMethod):
    """ΔW = rank-K SVD truncation of Σ_i trim(T_i), T_i = w_i ΔW_i.

    trim keeps the ``density`` fraction of largest-magnitude entries of each T_i, as in ties, but
    the kept entries are summed without a sign election.
    """

    name = "magnitude_prune"
    summary = "keep the largest entries of each dense delta, then sum; truncate to K"
    parameters = {"density": DENSITY}

    def combine(self, group: GroupInput, generators: Sequence[torch.Generator]) -> torch.Tensor:
        merged = None
        for delta in weighted_deltas(group):
            trimmed = keep_largest(delta, group.params["density"])
            merged = trimmed if merged is None else merged.add_(trimmed)
        return merged
