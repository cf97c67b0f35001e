"""dare_linear and dare_ties: DARE random drop and rescale on the true deltas, truncated to rank K."""

from __future__ import annotations

from typing import Sequence

import torch

from lorakit.methods.base import GroupInput
from lorakit.methods.dense import DENSITY, MAJORITY_SIGN_METHOD, DenseMethod, disjoint_mean, drop_random, weighted_deltas

__all__ = ["DareLinear", "DareTies"]


class DareLinear(DenseMethod):
    """ΔW = rank-K SVD truncation of Σ_i drop(T_i), T_i = w_i ΔW_i.

    drop zeroes each entry with probability 1 − density and divides the survivors by density, so
    E[drop(T)] = T (DARE, "drop and rescale"). One output is written per manifest seed.
    """

    name = "dare_linear"
    summary = "DARE on the dense deltas: random drop with 1/density rescale, then sum; truncate to K"
    uses_seed = True
    parameters = {"density": DENSITY}

    def combine(self, group: GroupInput, generators: Sequence[torch.Generator]) -> torch.Tensor:
        merged = None
        for delta in weighted_deltas(group):
            dropped = drop_random(delta, group.params["density"], generators)
            merged = dropped if merged is None else merged.add_(dropped)
        return merged


class DareTies(DenseMethod):
    """ΔW = rank-K SVD truncation of disjoint_mean(drop(T_1), …, drop(T_M)), T_i = w_i ΔW_i.

    DARE's random drop replaces TIES' magnitude trim, and the sign election and disjoint mean are
    those of ties. One output is written per manifest seed.
    """

    name = "dare_ties"
    summary = "DARE drop and rescale, then TIES sign election and disjoint mean; truncate to K"
    uses_seed = True
    keeps_every_source = True
    parameters = {"density": DENSITY, "majority_sign_method": MAJORITY_SIGN_METHOD}

    def combine(self, group: GroupInput, generators: Sequence[torch.Generator]) -> torch.Tensor:
        dropped = [drop_random(delta, group.params["density"], generators) for delta in weighted_deltas(group)]
        return disjoint_mean(dropped, group.params["majority_sign_method"])
