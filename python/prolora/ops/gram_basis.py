"""Shared steps of the Gram-matrix basis backends (gram-jacobi, gram-triton, ...): which side's
Gram matrix to form, and how to turn its eigendecomposition into Basis objects.

For W (m x n) with m <= n ("wide") G = W W^T = A^T A with A = W^T; otherwise G = W^T W with
A = W. The eigenvectors are one side's singular vectors; the other side is recovered as
W^T Q / S (wide) or W Q / S (tall) for the k vectors kept.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .svd import Basis, KSpec, resolve_k

# (matrix index, Q (d, k)) -> W_i^T Q (wide) or W_i Q (tall), float32
Recover = Callable[[int, torch.Tensor], torch.Tensor]


def gram_operand(Wb: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(A, wide) for a batch W (b, m, n): A (b, L, d) is a view with G = A^T A of the smaller side."""
    wide = Wb.shape[1] <= Wb.shape[2]
    return (Wb.mT if wide else Wb), wide


def bases_from_eigh(evals: torch.Tensor, evecs: torch.Tensor, energies: Sequence[float],
                    ks: Sequence[KSpec], recover: Recover, wide: bool) -> list[Basis]:
    """Bases from eigenpairs of each Gram matrix in DESCENDING order (evals (b, d), evecs (b, d, d))."""
    out = []
    S_all = evals.clamp_min(0).sqrt()
    S_host = S_all.cpu()  # one copy for the batch (k is chosen on the host); a no-op on the CPU
    for i, (k, energy) in enumerate(zip(ks, energies)):
        S = S_all[i]
        kk = resolve_k(k, S_host[i], energy)
        Q = evecs[i][:, :kk]
        Sk = S[:kk]
        inv = torch.where(Sk > 0, 1.0 / Sk, torch.zeros_like(Sk))
        other = recover(i, Q) * inv
        out.append(Basis(Q, S_host[i], other, energy) if wide else Basis(other, S_host[i], Q, energy))
    return out


def torch_recover(Wb: torch.Tensor, wide: bool) -> Recover:
    """Recovery with torch matmuls in float32, one matrix at a time (batch-independent)."""
    def rec(i: int, Q: torch.Tensor) -> torch.Tensor:
        W = Wb[i].to(torch.float32)
        return W.T @ Q if wide else W @ Q
    return rec
