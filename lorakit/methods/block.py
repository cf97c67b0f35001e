"""block: the first components of each source, in list order, to a total of K."""

from __future__ import annotations

from typing import Sequence

import torch

from lorakit.methods.base import GroupInput, GroupOutput, MergeMethod, common_scale, result_buffers

__all__ = ["Block", "block_allocation"]


def block_allocation(ranks: Sequence[int], rank: int) -> list[int]:
    """Return c_i, the number of leading components taken from each source.

    Each source gets ⌊K/M⌋, and the first K mod M sources one more. A source with fewer components
    than its share passes the shortfall to the sources after it; what is still missing after the
    last source goes to the first sources with components to spare.
    """
    count = len(ranks)
    shares = [rank // count + (1 if index < rank % count else 0) for index in range(count)]

    taken = []
    shortfall = 0
    for share, available in zip(shares, ranks):
        wanted = share + shortfall
        taken.append(min(wanted, available))
        shortfall = wanted - taken[-1]

    for index, available in enumerate(ranks):
        extra = min(shortfall, available - taken[index])
        taken[index] += extra
        shortfall -= extra
    return taken


class Block(MergeMethod):
    """ΔW = (1/K) Σ_selected w_i p_ij with p_ij = r_i s_i b_ij a_ijᵀ.

    With equal ranks and K = Σ r_i this is exactly the mean of the ΔW_i: the ensemble of M
    independently trained adapters.
    """

    name = "block"
    summary = "first components of each source in list order, scaled by 1/K"
    takes_rank = True

    def output_rank(self, ranks: Sequence[int], rank: int | None) -> int:
        rank = super().output_rank(ranks, rank)
        if rank > sum(ranks):
            raise ValueError(
                f"block rank {rank} exceeds the {sum(ranks)} components the sources have "
                f"(ranks {list(ranks)}); set a rank of at most {sum(ranks)}"
            )
        return rank

    def merge(self, group: GroupInput) -> GroupOutput:
        rank = group.rank
        ranks = [a.shape[1] for a in group.a]
        output_scale = common_scale(group.scales)

        merged_a, merged_b = result_buffers(group, rank)
        position = 0
        for a, b, count, source_rank, scale, weight in zip(
            group.a, group.b, block_allocation(ranks, rank), ranks, group.scales, group.weights
        ):
            if count == 0:
                continue
            # g = w_i · r_i · s_i / (K · s_out), split as √|g| on A and sign(g)·√|g| on B.
            coefficient = weight * source_rank * scale / (rank * output_scale)
            root = abs(coefficient) ** 0.5
            torch.mul(a[:, :count], root, out=merged_a[:, position : position + count])
            torch.mul(b[:, :, :count], root if coefficient >= 0 else -root, out=merged_b[:, :, position : position + count])
            position += count

        return GroupOutput(a=merged_a, b=merged_b, scale=output_scale)
