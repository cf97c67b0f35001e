"""cat: every component of every source, so the output delta is exactly Σ w_i ΔW_i."""

from __future__ import annotations

import torch

from lorakit.methods.base import GroupInput, GroupOutput, MergeMethod, common_scale

__all__ = ["Cat"]


class Cat(MergeMethod):
    """ΔW = Σ w_i ΔW_i, by concatenating the factors (output rank Σ r_i)."""

    name = "cat"
    summary = "concatenate every component; exact weighted sum of the deltas, rank Σ r_i"

    def merge(self, group: GroupInput) -> GroupOutput:
        output_scale = common_scale(group.scales)

        a_parts, b_parts = [], []
        for a, b, scale, weight in zip(group.a, group.b, group.scales, group.weights):
            # g_i = w_i · s_i / s_out, split as √|g| on A and sign(g)·√|g| on B.
            coefficient = weight * scale / output_scale
            root = abs(coefficient) ** 0.5
            a_parts.append(a * root)
            b_parts.append(b * (root if coefficient >= 0 else -root))

        return GroupOutput(a=torch.cat(a_parts, dim=1), b=torch.cat(b_parts, dim=2), scale=output_scale)
