"""cat: every component of every source, so the output delta is exactly Σ w_i ΔW_i."""

from __future__ import annotations

import torch

from lorakit.methods.base import GroupInput, GroupOutput, MergeMethod, common_scale, result_buffers

__all__ = ["Cat"]


class Cat(MergeMethod):
    """ΔW = Σ w_i ΔW_i, by concatenating the factors (output rank Σ r_i)."""

    name = "cat"
    summary = "concatenate every component; exact weighted sum of the deltas, rank Σ r_i"

    def merge(self, group: GroupInput) -> GroupOutput:
        output_scale = common_scale(group.scales)

        merged_a, merged_b = result_buffers(group, sum(a.shape[1] for a in group.a))
        position = 0
        for a, b, scale, weight in zip(group.a, group.b, group.scales, group.weights):
            # g_i = w_i · s_i / s_out, split as √|g| on A and sign(g)·√|g| on B.
            coefficient = weight * scale / output_scale
            root = abs(coefficient) ** 0.5
            count = a.shape[1]
            torch.mul(a, root, out=merged_a[:, position : position + count])
            torch.mul(b, root if coefficient >= 0 else -root, out=merged_b[:, :, position : position + count])
            position += count

        return GroupOutput(a=merged_a, b=merged_b, scale=output_scale)
