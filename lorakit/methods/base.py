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
    "result_buffers",
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
        out: float32 tensors (L, K, n) and (L, m, K) on the merge device that the method may write
            its result into and return, or None. The caller reuses them for every batch, which
            spares the page faults of fresh memory on a CPU.
        scratch: a uint8 buffer on the merge device of at least the float32 bytes of every
            factor in ``a`` and ``b``, which the method may carve temporaries from (as
            ``concatenate_sources`` does), or None. Reused for every batch, like ``out``.
    """

    module_paths: Sequence[str]
    a: Sequence[torch.Tensor]
    b: Sequence[torch.Tensor]
    scales: Sequence[float]
    weights: Sequence[float]
    rank: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    out: tuple[torch.Tensor, torch.Tensor] | None = None
    scratch: torch.Tensor | None = None


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
    """Stack every source's components: A (L, R, n) and B (L, m, R), R = Σ r_i, in source order.

    The result lives in ``group.scratch`` when the caller gives one, so a second call in the same
    merge overwrites the first one's result.
    """
    if group.scratch is None:
        return torch.cat(list(group.a), dim=1), torch.cat(list(group.b), dim=2)
    count, _, in_size = group.a[0].shape
    out_features = group.b[0].shape[1]
    total = sum(a.shape[1] for a in group.a)
    a_size = count * total * in_size
    floats = group.scratch.view(torch.float32)
    a_out = floats[:a_size].view(count, total, in_size)
    b_out = floats[a_size : a_size + count * out_features * total].view(count, out_features, total)
    return torch.cat(list(group.a), dim=1, out=a_out), torch.cat(list(group.b), dim=2, out=b_out)


def result_buffers(group: GroupInput, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return float32 A' (L, K, n) and B' (L, m, K) for a result of rank K: ``group.out``, else new tensors.

    Raises:
        ValueError: when ``group.out`` has other shapes.
    """
    count, _, in_size = group.a[0].shape
    out_features = group.b[0].shape[1]
    a_shape, b_shape = (count, rank, in_size), (count, out_features, rank)
    if group.out is None:
        device = group.a[0].device
        return torch.empty(a_shape, device=device), torch.empty(b_shape, device=device)
    a, b = group.out
    if tuple(a.shape) != a_shape or tuple(b.shape) != b_shape:
        raise ValueError(f"result buffers are {tuple(a.shape)} and {tuple(b.shape)}, the result {a_shape} and {b_shape}")
    return a, b


def select_components(
    a: torch.Tensor,
    b: torch.Tensor,
    index: torch.Tensor,
    coefficient: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather components and give them coefficient g: ΔW' = Σ_k g_k · b_k a_kᵀ.

    Each selected component is multiplied by √|g| on A and by sign(g)·√|g| on B, so both factors
    stay of similar size.

    Args:
        a: (L, R, n) concatenated A.
        b: (L, m, R) concatenated B.
        index: (K,) component indices shared by every module, or (L, K) per module.
        coefficient: the same shape as ``index``, in float64 so the square root rounds once.
        out: tensors of the result's shapes and dtype to write into, or None for new ones.

    Returns:
        A' (L, K, n) and B' (L, m, K).
    """
    root = coefficient.abs().sqrt()
    a_factor = root.to(a.dtype)
    b_factor = (root * coefficient.sign()).to(a.dtype)
    a_out, b_out = out if out is not None else (None, None)

    if index.dim() == 1:
        a_selected = torch.index_select(a, 1, index, out=a_out)
        b_selected = torch.index_select(b, 2, index, out=b_out)
        return a_selected.mul_(a_factor[None, :, None]), b_selected.mul_(b_factor[None, None, :])

    # Rows of A are selected from A flattened to (L·R, n), a plain row copy that ran 7 times faster
    # than a gather with an index per element.
    count, total, rows = a.shape
    flat = (index + torch.arange(count, device=index.device)[:, None] * total).reshape(-1)
    a_flat_out = a_out.view(count * index.shape[1], rows) if a_out is not None else None
    a_selected = torch.index_select(a.reshape(count * total, rows), 0, flat, out=a_flat_out).view(count, -1, rows)
    b_selected = torch.gather(b, 2, index[:, None, :].expand(-1, b.shape[1], -1), out=b_out)
    return a_selected.mul_(a_factor[:, :, None]), b_selected.mul_(b_factor[:, None, :])


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
