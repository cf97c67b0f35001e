"""ties: TIES-Merging on the true deltas (trim, elect sign, disjoint mean), truncated to rank K."""

from __future__ import annotations

from typing import Sequence

import torch

from lorakit.methods.base import GroupInput
from lorakit.methods.dense import DENSITY, MAJORITY_SIGN_METHOD, DenseMethod, disjoint_mean, keep_largest, weighted_deltas

__all__ = ["Ties"]


class Ties(DenseMethod):
    """ΔW = rank-K SVD truncation of disjoint_mean(trim(T_1), …, trim(T_M)), T_i = w_i ΔW_i.

    trim keeps the ``density`` fraction of largest-magnitude entries of each T_i. disjoint_mean
    elects a sign per entry and averages the entries that agree (TIES-Merging).
    The vote uses the weighted deltas, so a negative weight votes against its source's signs.
    """

    name = "ties"
    summary = "TIES on the dense deltas: keep the largest entries, elect signs, average agreeing entries; truncate to K"
    keeps_every_source = True
    parameters = {"density": DENSITY, "majority_sign_method": MAJORITY_SIGN_METHOD}

    def combine(self, group: GroupInput, generators: Sequence[torch.Generator]) -> torch.Tensor:
        density = group.params["density"]
        trimmed = [keep_largest(delta, density) for delta in weighted_deltas(group)]
        return disjoint_mean(trimmed, group.params["majority_sign_method"])
