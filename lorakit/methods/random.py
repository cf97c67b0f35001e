"""random: K components drawn with replacement, a source uniformly, then one of its components."""

from __future__ import annotations

import torch

from lorakit.methods.base import (
    GroupInput,
    GroupOutput,
    MergeMethod,
    common_scale,
    concatenate_sources,
    module_generator,
    result_buffers,
    select_components,
)

__all__ = ["Random"]


class Random(MergeMethod):
    """ΔW = (1/K) Σ_draws w_i p_ij, one draw sequence per (seed, module path).

    The draws are made on the CPU, so the same seed gives the same draws on any device.
    """

    name = "random"
    summary = "K components drawn with replacement (source, then component), scaled by 1/K"
    takes_rank = True
    uses_seed = True

    def merge(self, group: GroupInput) -> GroupOutput:
        rank = group.rank
        ranks = torch.tensor([a.shape[1] for a in group.a], dtype=torch.int64)
        offsets = torch.cumsum(ranks, 0) - ranks
        output_scale = common_scale(group.scales)
        # Per-source coefficient g_i = w_i · r_i · s_i / (K · s_out), in float64.
        coefficients = torch.tensor(
            [w * int(r) * s / (rank * output_scale) for w, r, s in zip(group.weights, ranks, group.scales)],
            dtype=torch.float64,
        )

        sources, components = [], []
        for path in group.module_paths:
            generator = module_generator(group.seed, path)
            source = torch.randint(len(ranks), (rank,), generator=generator)
            # floor(u · r) with u uniform in [0, 1) picks a component uniformly from each drawn source.
            uniform = torch.rand(rank, generator=generator, dtype=torch.float64)
            component = (uniform * ranks[source]).floor().to(torch.int64)
            sources.append(source)
            components.append(component)
        sources_t = torch.stack(sources)
        components_t = torch.stack(components)

        a, b = concatenate_sources(group)
        index = (offsets[sources_t] + components_t).to(a.device)
        merged_a, merged_b = select_components(
            a, b, index, coefficients[sources_t].to(a.device), out=result_buffers(group, rank)
        )

        records = [
            {"draws": torch.stack([source, component], dim=1).tolist()}
            for source, component in zip(sources, components)
        ]
        return GroupOutput(a=merged_a, b=merged_b, scale=output_scale, records=records)
