"""The interface every merge method implements, and the component arithmetic they share.

Notation (the README uses the same): for one module and source i, A_i is (r_i, n) and B_i is
(m, r_i), with n the flattened input size (in_features, or in·kh·kw for a convolution) and m the
output size. The source's scale is s_i = alpha_i / r_i (alpha_i / sqrt(r_i) with rsLoRA), its
weight w_i, and its delta ΔW_i = s_i · B_i @ A_i. Component j of source i is (row j of A_i,
column j of B_i).

A method works on a group: L modules of one projection that share every shape, stacked along a
leading batch dimension, so that one tensor operation serves every layer.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch

__all__ = [
    "GroupInput",
    "GroupOutput",
    "MergeMethod",
    "Parameter",
    "common_scale",
    "concatenate_sources",
    "module_generator",
    "select_components",
    "weight_sum_or_raise",
]


@dataclass(frozen=True)
class Parameter:
    """An extra manifest key a method accepts, with its JSON type and default."""

    kind: type
    default: Any = None
    help: str = ""


@dataclass
class GroupInput:
    """Stacked factors of L modules from M sources, all float32 on the merge device.

    Attributes:
        module_paths: the L module paths, without the ``base_model.model.`` prefix.
        a: M tensors of shape (L, r_i, n).
        b: M tensors of shape (L, m, r_i).
        scales: s_i per source; one value per source because a group never mixes scales.
        weights: w_i per source.
        rank: target rank K, for methods that take one.
        params: the method's extra parameters, defaults filled in.
        seed: the output's seed, for methods that draw at random.
    """

    module_paths: Sequence[str]
    a: Sequence[torch.Tensor]
    b: Sequence[torch.Tensor]
    scales: Sequence[float]
    weights: Sequence[float]
    rank: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None


@dataclass
class GroupOutput:
    """Merged factors: ``a`` (L, K, n), ``b`` (L, m, K), so that ΔW = scale · b @ a per module.

    ``records`` holds one JSON-ready dict per module for the provenance (draws, energy kept), or
    is empty.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    records: list[dict[str, Any]] = field(default_factory=list)


class MergeMethod:
    """A merge method: subclasses set the class attributes and implement ``merge``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    takes_rank: ClassVar[bool] = False
    uses_seed: ClassVar[bool] = False
    equal_ranks: ClassVar[bool] = False
    parameters: ClassVar[Mapping[str, Parameter]] = {}

    def dense_buffers(self, sources: int) -> int:
        """Return how many float32 (out, in) tensors per module the method keeps at its peak.

        Methods that work on factors return 0. Methods that form dense deltas override this, so
        the plan can size its batches and estimate peak memory.
        """
        return 0

    def rank_limit(self, ranks: Sequence[int], out_features: int, in_size: int) -> int | None:
        """Return the highest output rank that can carry information, or None when there is none.

        The plan lowers a requested rank above this limit to the limit.
        """
        return None

    def output_rank(self, ranks: Sequence[int], rank: int | None) -> int:
        """Return the output rank for sources of ``ranks`` and a requested ``rank``.

        Raises:
            ValueError: when the request cannot be met, with a message that names the fix.
        """
        if self.takes_rank and rank is not None:
            return rank
        if self.takes_rank:
            raise ValueError(f"{self.name} needs a target rank; set merge.rank or a rank for this projection")
        return sum(ranks)

    def output_scale(self, scales: Sequence[float]) -> float:
        """Return the output's scale alpha / K for sources of ``scales``."""
        return common_scale(scales)

    def merge(self, group: GroupInput) -> GroupOutput:
        """Merge one group; the result's ``scale`` must equal ``output_scale(group.scales)``."""
        raise NotImplementedError


def common_scale(scales: Sequence[float]) -> float:
    """Return the output scale: the sources' scale when they all share it, else 1.

    Keeping a shared scale keeps the output's alpha / r equal to the sources'.
    """
    first = scales[0]
    return first if all(scale == first for scale in scales) else 1.0


def concatenate_sources(group: GroupInput) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack every source's components: A (L, R, n) and B (L, m, R), R = Σ r_i, in source order."""
    return torch.cat(list(group.a), dim=1), torch.cat(list(group.b), dim=2)


def select_components(
    a: torch.Tensor, b: torch.Tensor, index: torch.Tensor, coefficient: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather components and give them coefficient g: ΔW' = Σ_k g_k · b_k a_kᵀ.

    Each selected component is multiplied by √|g| on A and by sign(g)·√|g| on B, so both factors
    stay of similar size.

    Args:
        a: (L, R, n) concatenated A.
        b: (L, m, R) concatenated B.
        index: (K,) component indices shared by every module, or (L, K) per module.
        coefficient: the same shape as ``index``, in float64 so the square root rounds once.

    Returns:
        A' (L, K, n) and B' (L, m, K).
    """
    root = coefficient.abs().sqrt()
    a_factor = root.to(a.dtype)
    b_factor = (root * coefficient.sign()).to(a.dtype)

    if index.dim() == 1:
        a_selected = a.index_select(1, index)
        b_selected = b.index_select(2, index)
        return a_selected * a_factor[None, :, None], b_selected * b_factor[None, None, :]

    rows = a.shape[2]
    a_selected = torch.gather(a, 1, index[:, :, None].expand(-1, -1, rows))
    b_selected = torch.gather(b, 2, index[:, None, :].expand(-1, b.shape[1], -1))
    return a_selected * a_factor[:, :, None], b_selected * b_factor[:, None, :]


def module_generator(seed: int, module_path: str) -> torch.Generator:
    """Return a CPU generator seeded from (seed, module path).

    Hashing the pair makes each module's draws independent of module order, batching and device.
    """
    digest = hashlib.sha256(f"{seed}\0{module_path}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def weight_sum_or_raise(weights: Sequence[float], method: str) -> float:
    """Return Σ w_i, raising when it is zero because a method divides by it."""
    total = math.fsum(weights)
    if total == 0:
        raise ValueError(f"the source weights sum to zero, so {method} cannot normalise by them; change a weight")
    return total
