"""The Gram matrix of a basis: G = A^T A for A (L, d), the smaller side of a weight.

On a CPU with d >= SYRK_MIN it is formed as a symmetric rank-L update ("syrk"): only the blocks
of the lower triangle are multiplied (SYRK_BLOCKS x SYRK_BLOCKS blocks: (b + 1) / 2b of the
products of one full GEMM, 62.5% at 4 blocks) and the upper triangle is mirrored from them.
torch has no syrk and the BLAS syrk of scipy's OpenBLAS is slower than MKL's GEMM on these
shapes, so the blocks are plain torch products (measured in docs/performance.md). Below SYRK_MIN,
and on a GPU, one product (there the eigensolver, not the product, is the cost).
"""
from __future__ import annotations

import torch

SYRK_MIN = 512
SYRK_BLOCKS = 4


def gram_matrix(A: torch.Tensor, blocks: int | None = None) -> torch.Tensor:
    """A^T A (d x d, both triangles) for A (L, d) in its dtype (float32 or float64)."""
    d = A.shape[1]
    nb = blocks if blocks is not None else (SYRK_BLOCKS if d >= SYRK_MIN and not A.is_cuda else 1)
    if nb <= 1:
        return A.T @ A
    cuts = [round(i * d / nb) for i in range(nb + 1)]
    G = torch.empty(d, d, dtype=A.dtype, device=A.device)
    for i in range(nb):
        Ai = A[:, cuts[i]:cuts[i + 1]]
        for j in range(i + 1):
            blk = Ai.T @ A[:, cuts[j]:cuts[j + 1]]
            G[cuts[i]:cuts[i + 1], cuts[j]:cuts[j + 1]] = blk
            if j < i:
                G[cuts[j]:cuts[j + 1], cuts[i]:cuts[i + 1]] = blk.T
    return G
