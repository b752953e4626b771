"""The Gram matrix of a basis: G = A^T A for A (L, d), the smaller side of a weight.

On a CPU with d >= SYRK_MIN it is formed as a symmetric rank-L update ("syrk"): only the blocks
of the lower triangle are multiplied (b x b blocks: (b + 1) / 2b of the products of one full GEMM,
75% at 2 blocks, 62.5% at 4) and the upper triangle is mirrored from them. Smaller blocks pay
only where the blocks' products stay large: 4 blocks where L >= 3 d (the feed-forward layers),
else 2 (measured, one thread: 10240 x 1280 in 0.52x the GEMM's time with 4 blocks, 1280 x 5120
0.73x; 1280 x 1280 and 1280 x 2048 0.75-0.8x with 2, no better with 4). torch has no syrk and
the BLAS syrk of scipy's OpenBLAS is slower than MKL's GEMM blocks here, so the blocks are plain
torch products. Below SYRK_MIN, and on a GPU, one product (there the eigensolver, not the
product, is the cost).
"""
from __future__ import annotations

import torch

SYRK_MIN = 512


def blocks_for(L: int, d: int) -> int:
    """How many row/column blocks the syrk of A (L, d) uses on a CPU (see the module doc)."""
    if d < SYRK_MIN:
        return 1
    return 4 if L >= 3 * d else 2


def gram_matrix(A: torch.Tensor, blocks: int | None = None) -> torch.Tensor:
    """A^T A (d x d, both triangles) for A (L, d) in its dtype (float32 or float64)."""
    d = A.shape[1]
    nb = blocks if blocks is not None else (1 if A.is_cuda else blocks_for(A.shape[0], d))
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
