"""svd: the best rank-K approximation of Σ w_i ΔW_i, computed from the factors alone."""

from __future__ import annotations

from typing import Sequence

import torch

from lorakit.methods.base import GroupInput, GroupOutput, MergeMethod
from lorakit.methods.truncation import factor_space_svd, split_factors

__all__ = ["Svd"]


class Svd(MergeMethod):
    """ΔW = best rank-K approximation (Eckart–Young) of ΣΔ = Σ w_i s_i B_i A_i.

    Works exactly in factor space: B = [w_1 s_1 B_1, …, w_M s_M B_M] (m, R) and A = [A_1; …; A_M]
    (R, n) with R = Σ r_i satisfy B @ A = ΣΔ, and ``factor_space_svd`` takes the SVD of B @ A through
    QR of B and Aᵀ and an SVD of the R × R core. Each kept σ is split as √σ on both factors. ΣΔ has
    rank at most min(R, m, n), so a larger K is lowered to that and reproduces ΣΔ exactly.
    """

    name = "svd"
    summary = "best rank-K approximation of the weighted sum of deltas, exact, computed from the factors"
    takes_rank = True

    def rank_limit(self, ranks: Sequence[int], out_features: int, in_size: int) -> int:
        return min(sum(ranks), out_features, in_size)

    def merge(self, group: GroupInput) -> GroupOutput:
        scale = self.output_scale(group.scales)
        b = torch.cat([b * (weight * source_scale) for b, weight, source_scale in zip(group.b, group.weights, group.scales)], dim=2)
        a = torch.cat(list(group.a), dim=1)

        rank = min(group.rank, self.rank_limit([part.shape[1] for part in group.a], b.shape[1], a.shape[2]))
        triplets = factor_space_svd(a, b, rank)
        merged_a, merged_b = split_factors(triplets, scale)
        records = [{"energy_kept": energy} for energy in triplets.energy_kept]
        return GroupOutput(a=merged_a, b=merged_b, scale=scale, records=records)
