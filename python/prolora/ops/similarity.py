"""principal_cosines: cosines of the principal angles between two subspaces (orthonormal bases)."""
from __future__ import annotations

import torch

from .registry import Op

principal_cosines = Op("principal_cosines", "cosines of the principal angles between span(A) and span(B)")


@principal_cosines.register("reference", reference=True)
def _cosines_reference(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Singular values of A^T B, clamped to [0, 1], descending."""
    dtype = dtype or torch.float64
    M = A.to(dtype).T @ B.to(dtype)
    return torch.linalg.svdvals(M).clamp_(0.0, 1.0)


def phi(A: torch.Tensor, B: torch.Tensor) -> float:
    """Mean squared principal cosine ||A^T B||_F^2 / k (1 = same subspace), no SVD needed."""
    k = A.shape[1]
    if k == 0:
        return 1.0
    M = A.T @ B.to(A.dtype)
    return float((M.double() ** 2).sum() / k)


def phi_null(phi_value: float, dim: int, k: int) -> float | None:
    """Similarity of the complements: ||U_s,perp^T U_t,perp||_F^2 / (dim - k) = (dim - 2k + k*phi)/(dim - k)."""
    if dim <= k:
        return None
    return (dim - 2 * k + k * phi_value) / (dim - k)
