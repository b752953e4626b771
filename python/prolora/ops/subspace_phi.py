"""subspace_phi: phi = ||A^T B||_F^2 / k_A (the mean squared principal cosine, 1 = same
subspace) for a batch of basis pairs at once, e.g. U_s, U_t of every same-shape layer of a chunk.

Backends take A (b, m, ka), B (b, m, kb) (or one pair, 2-D) and return float64 phi of shape (b,)
(0-d for one pair); k_A = 0 gives phi = 1, as ops.phi does.
"""
from __future__ import annotations

import torch

from .registry import Op

subspace_phi = Op("subspace_phi", "phi = ||A^T B||_F^2 / k for a batch of orthonormal basis pairs")


def check_pair(A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() not in (2, 3) or A.dim() != B.dim() or A.shape[:-1] != B.shape[:-1]:
        raise ValueError(f"subspace_phi: A {tuple(A.shape)} and B {tuple(B.shape)} must be (b, m, k) "
                         f"or (m, k) with the same leading dimensions")


def finish(sq: torch.Tensor, ka: int) -> torch.Tensor:
    """phi from the squared Frobenius norms (float64)."""
    return torch.ones_like(sq) if ka == 0 else sq / ka


@subspace_phi.register("reference", reference=True)
def _phi_reference(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """float64 product and sum of squares (unless told another dtype for the product)."""
    check_pair(A, B)
    dt = dtype or torch.float64
    M = A.to(dt).mT @ B.to(dt)
    return finish((M.double() ** 2).sum((-2, -1)), A.shape[-1])


@subspace_phi.register("torch", priority=10)
def _phi_torch(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One batched float32 product (bmm), squares summed in float64."""
    check_pair(A, B)
    dt = dtype or torch.float32
    M = A.to(dt).mT @ B.to(dt)
    return finish((M.double() ** 2).sum((-2, -1)), A.shape[-1])
