"""Rank truncation shared by the methods that take a target rank K and return an SVD.

Two entry points return the singular triplets of a batch of (m, n) matrices:

* ``factor_space_svd`` gets them from stacked factors B (L, m, R) and A (L, R, n) without forming
  B @ A: with B = Q_b R_b and Aᵀ = Q_a R_a, B @ A = Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD of the small core
  R_b R_aᵀ = U Σ Vᵀ gives B @ A = (Q_b U) Σ (Q_a V)ᵀ. The cost is O(L·R²·(m + n)) and no (m, n) matrix
  is allocated.
* ``truncated_svd`` gets the leading triplets of dense matrices (L, m, n), exactly with
  ``torch.linalg.svd`` or with a randomized range finder when the matrix is much larger than K.

``split_factors`` turns K triplets into LoRA factors with √σ on each side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "OVERSAMPLING",
    "POWER_ITERATIONS",
    "Triplets",
    "factor_space_svd",
    "sketch_size",
    "split_factors",
    "truncated_svd",
]

# The randomized SVD's minimum oversampling (sketch columns beyond K) and its power iterations.
# Sparsified deltas have slowly decaying spectra, so a wide sketch (l = max(2K, K + 16)) and four
# power iterations keep the captured energy close to the optimum of an exact SVD.
OVERSAMPLING = 16
POWER_ITERATIONS = 4


@dataclass
class Triplets:
    """The leading singular triplets of L matrices and the share of energy they hold.

    Attributes:
        u: (L, m, K) left singular vectors, float32.
        s: (L, K) singular values, float32, descending.
        vh: (L, K, n) right singular vectors as rows, float32.
        energy_kept: per matrix, Σ_{k≤K} σ_k² / ‖M‖_F² (1.0 for a zero matrix).
        solver: ``exact`` or ``randomized``.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    energy_kept: list[float]
    solver: str


def _energy_fraction(kept: torch.Tensor, total: torch.Tensor) -> list[float]:
    """Return kept / total per matrix, counting a zero matrix as fully kept."""
    kept = kept.double().cpu()
    total = total.double().cpu()
    fraction = torch.where(total > 0, kept / total.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(total))
    return [min(1.0, value) for value in fraction.tolist()]


def factor_space_svd(a: torch.Tensor, b: torch.Tensor, rank: int) -> Triplets:
    """Return the leading ``rank`` singular triplets of B @ A without forming it.

    Args:
        a: (L, R, n) stacked A factors, float32.
        b: (L, m, R) stacked B factors with the weights and scales already folded in, float32.
        rank: K, at most min(R, m, n).

    The QR factorisations run in float32 on the device. The core, at most R × R, and its SVD run
    in float64, which costs little at that size and keeps small singular values accurate.
    """
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.transpose(1, 2))
    core = r_b.double() @ r_a.double().transpose(1, 2)
    u_core, s_core, vh_core = torch.linalg.svd(core, full_matrices=False)

    squared = s_core.square()
    energy = _energy_fraction(squared[:, :rank].sum(dim=1), squared.sum(dim=1))
    u = q_b @ u_core[:, :, :rank].to(b.dtype)
    vh = vh_core[:, :rank, :].to(a.dtype) @ q_a.transpose(1, 2)
    return Triplets(u=u, s=s_core[:, :rank].to(a.dtype), vh=vh, energy_kept=energy, solver="factor-space")


def sketch_size(rank: int, out_features: int, in_size: int) -> int:
    """Return l, the randomized range finder's sketch width: max(2K, K + 16), at most min(m, n)."""
    return min(max(2 * rank, rank + OVERSAMPLING), out_features, in_size)


def truncated_svd(delta: torch.Tensor, rank: int, generators: Sequence[torch.Generator]) -> Triplets:
    """Return the leading ``rank`` singular triplets of each dense matrix in ``delta``.

    When the sketch width l (see ``sketch_size``) reaches min(m, n), a sketch would be no smaller
    than the matrix, so ``torch.linalg.svd`` computes the exact triplets. Otherwise a randomized
    SVD (a range finder with subspace iteration) does. It forms Y = M Ω with a Gaussian Ω (n, l)
    drawn on the CPU from the module's generator, runs ``POWER_ITERATIONS`` rounds of power
    iteration with QR re-orthonormalisation, sets Q = orth(Y) and takes the exact SVD of Qᵀ M (l, n).
    The result is the truncation of M projected onto span(Q), so its energy share is measured and
    reported, not assumed optimal.

    Args:
        delta: (L, m, n) float32 matrices.
        rank: K, at most min(m, n).
        generators: one CPU generator per matrix, used only by the randomized solver.
    """
    count, rows, columns = delta.shape
    width = sketch_size(rank, rows, columns)

    if width >= min(rows, columns):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        squared = s.double().square()
        energy = _energy_fraction(squared[:, :rank].sum(dim=1), squared.sum(dim=1))
        return Triplets(u=u[:, :, :rank], s=s[:, :rank], vh=vh[:, :rank, :], energy_kept=energy, solver="exact")

    omega = torch.stack([torch.randn((columns, width), generator=generator) for generator in generators])
    sample = delta @ omega.to(delta.device)
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(sample).Q
        basis = torch.linalg.qr(delta.transpose(1, 2) @ basis).Q
        sample = delta @ basis
    basis = torch.linalg.qr(sample).Q

    u_small, s, vh = torch.linalg.svd(basis.transpose(1, 2) @ delta, full_matrices=False)
    total = torch.linalg.vector_norm(delta, dim=(1, 2)).double().square()
    energy = _energy_fraction(s[:, :rank].double().square().sum(dim=1), total)
    u = basis @ u_small[:, :, :rank]
    return Triplets(u=u, s=s[:, :rank], vh=vh[:, :rank, :], energy_kept=energy, solver="randomized")


def split_factors(triplets: Triplets, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn triplets into factors A' = √σ·Vᵀ / √s and B' = U·√σ / √s, so that s·B' @ A' = U Σ Vᵀ.

    Returns:
        A' (L, K, n) and B' (L, m, K), float32.
    """
    root = (triplets.s / scale).sqrt()
    return root[:, :, None] * triplets.vh, triplets.u * root[:, None, :]
