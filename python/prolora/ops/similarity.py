"""Subspace similarity: the principal angles between two subspaces (orthonormal bases) and phi,
their mean squared cosine, which needs no SVD (batched over many layers: the subspace_phi op)."""
from __future__ import annotations

import torch


def principal_cosines(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Cosines of the principal angles between span(A) and span(B): the singular values of
    A^T B (in float64 unless told), clamped to [0, 1], descending. The definition phi and the
    tests build on; the engine needs only phi."""
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
