"""soups: weighted average of the factors themselves (model soups on A and B)."""

from __future__ import annotations

from typing import Sequence

import torch

from lorakit.methods.base import GroupInput, GroupOutput, MergeMethod, common_scale, result_buffers, weight_sum_or_raise

__all__ = ["Soups"]


class Soups(MergeMethod):
    """A' = Σ w_i A_i / Σ w_i and B' = Σ w_i B_i / Σ w_i.

    This averages factors, not deltas: B' A' contains the cross terms B_i A_j, so it is not the
    mean of the ΔW_i. When the sources' scales differ, √s_i is folded into both factors of source i
    first and the output scale is 1.
    """

    name = "soups"
    summary = "weighted mean of the A factors and of the B factors (not of the deltas)"
    equal_ranks = True

    def output_rank(self, ranks: Sequence[int], rank: int | None) -> int:
        if len(set(ranks)) > 1:
            raise ValueError(
                f"soups averages factors, so every source needs the same rank, got {list(ranks)}; "
                "use block, cat or svd for sources of different ranks"
            )
        return ranks[0]

    def merge(self, group: GroupInput) -> GroupOutput:
        total = weight_sum_or_raise(group.weights, self.name)
        output_scale = common_scale(group.scales)

        merged_a, merged_b = result_buffers(group, group.a[0].shape[1])
        for index, (a, b, scale, weight) in enumerate(zip(group.a, group.b, group.scales, group.weights)):
            fold = 1.0 if output_scale == scale else scale**0.5
            factor = weight * fold / total
            if index == 0:
                torch.mul(a, factor, out=merged_a)
                torch.mul(b, factor, out=merged_b)
            else:
                # add_ with alpha scales and adds in one pass, without an output-sized temporary.
                merged_a.add_(a, alpha=factor)
                merged_b.add_(b, alpha=factor)

        return GroupOutput(a=merged_a, b=merged_b, scale=output_scale)
