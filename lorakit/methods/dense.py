"""The base of the methods that sparsify dense deltas (ties, dare_*, magnitude_prune).

Such a method forms each source's weighted delta T_i = w_i · s_i · B_i @ A_i as a dense (m, n)
float32 matrix, for the L modules of a batch at once, combines them entrywise, and truncates the
result to rank K with ``truncated_svd``. Weighting before sparsifying changes nothing in the
entries kept: |w·x| orders entries like |x|, and a random mask does not look at values.

Every random draw comes from the module's generator ``module_generator(seed, module path)``
(seed 0 for the methods that take no seed), in this order: the drop masks of sources 1..M (dare
only), then the Gaussian sketch of the randomized SVD (large matrices only).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from lorakit.methods.base import GroupInput, GroupOutput, MergeMethod, Parameter, module_generator
from lorakit.methods.truncation import split_factors, truncated_svd

__all__ = [
    "DENSITY",
    "MAJORITY_SIGN_METHOD",
    "DenseMethod",
    "disjoint_mean",
    "drop_random",
    "keep_largest",
    "weighted_deltas",
]

DENSITY = Parameter(float, None, "the fraction of delta entries kept, in (0, 1]")
MAJORITY_SIGN_METHOD = Parameter(
    str, "total", "how each entry's sign is elected: total (sign of Σ T_i) or frequency (sign of Σ sign(T_i))"
)


def weighted_deltas(group: GroupInput) -> Iterator[torch.Tensor]:
    """Yield T_i = w_i · s_i · B_i @ A_i, (L, m, n) float32, one source at a time."""
    for a, b, scale, weight in zip(group.a, group.b, group.scales, group.weights):
        yield (b * (weight * scale)) @ a


def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the largest-magnitude entries of each matrix, in place, and return ``delta``.

    Each (m, n) matrix keeps k = max(1, round(density · m · n)) entries: those with |x| at least
    the k-th largest magnitude. Entries tied with that threshold are all kept, so ties can keep a
    few more than k.

    Args:
        delta: (L, m, n) float32, overwritten.
        density: the fraction kept, in (0, 1].
    """
    count, rows, columns = delta.shape
    size = rows * columns
    keep = max(1, round(density * size))
    magnitude = delta.abs()
    threshold = magnitude.reshape(count, size).kthvalue(size - keep + 1, dim=1).values
    return delta.masked_fill_(magnitude < threshold[:, None, None], 0.0)


def drop_random(delta: torch.Tensor, density: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Drop entries at random, in place, and rescale the survivors by 1/density (DARE).

    For matrix j, u = ``torch.rand((m, n), generator=generators[j])`` is drawn in float32 on the
    CPU, so the mask is the same on every device. An entry survives where u < density.

    Args:
        delta: (L, m, n) float32, overwritten.
        density: the survival probability, in (0, 1]; 1 keeps every entry unchanged.
        generators: one CPU generator per matrix.
    """
    _, rows, columns = delta.shape
    for index, generator in enumerate(generators):
        uniform = torch.rand((rows, columns), generator=generator)
        delta[index].masked_fill_((uniform >= density).to(delta.device), 0.0)
    return delta.div_(density)


def disjoint_mean(deltas: Sequence[torch.Tensor], majority_sign_method: str) -> torch.Tensor:
    """Elect a sign per entry and average the entries that agree with it (TIES-Merging).

    The elected sign is +1 where Σ_i T_i ≥ 0 (``total``) or Σ_i sign(T_i) ≥ 0 (``frequency``), else
    −1. An entry of T_i agrees when sign(T_i) equals it, so zeros never agree. The result is
    Σ_i T_i·[agrees] / max(1, Σ_i [agrees]).

    Args:
        deltas: M tensors T_i of shape (L, m, n).
        majority_sign_method: ``total`` or ``frequency``.
    """
    votes = torch.zeros_like(deltas[0])
    for delta in deltas:
        votes += delta if majority_sign_method == "total" else delta.sign()
    elected = torch.where(votes >= 0, 1.0, -1.0)
    del votes

    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for delta in deltas:
        agrees = delta.sign() == elected
        total += delta * agrees
        count += agrees
    return total.div_(count.clamp_min_(1.0))


class DenseMethod(MergeMethod):
    """A method that combines dense deltas entrywise, then truncates to rank K.

    Subclasses implement ``combine`` and set ``keeps_every_source`` when they hold all M sparsified
    deltas at once (for sign election).
    """

    takes_rank = True
    keeps_every_source = False

    def dense_buffers(self, sources: int) -> int:
        # An estimate: the running result, the current delta, its magnitudes, the copy kthvalue
        # makes and a mask. The methods that elect signs also keep every source's delta.
        return sources + 4 if self.keeps_every_source else 5

    def rank_limit(self, ranks: Sequence[int], out_features: int, in_size: int) -> int:
        return min(out_features, in_size)

    def combine(self, group: GroupInput, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Return the merged dense deltas (L, m, n), before truncation."""
        raise NotImplementedError

    def merge(self, group: GroupInput) -> GroupOutput:
        scale = self.output_scale(group.scales)
        seed = group.seed if group.seed is not None else 0
        generators = [module_generator(seed, path) for path in group.module_paths]

        merged = self.combine(group, generators)
        _, rows, columns = merged.shape
        triplets = truncated_svd(merged, min(group.rank, rows, columns), generators)
        del merged

        merged_a, merged_b = split_factors(triplets, scale)
        records = [{"energy_kept": energy, "truncation": triplets.solver} for energy in triplets.energy_kept]
        return GroupOutput(a=merged_a, b=merged_b, scale=scale, records=records)
