"""truncated_svd: the top-k singular subspaces of a weight, plus as much of its spectrum as the
backend knows (the reference knows all of it)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import Op, Problem


@dataclass
class Basis:
    """Top-k singular triplets of a weight W (m x n): W ~ U diag(S[:k]) V^T.

    `S` holds at least k values (all min(m, n) of them when the backend computes the full
    spectrum); `energy` is ||W||_F^2, so energy fractions can be computed from a partial S.
    """

    U: torch.Tensor  # (m, k)
    S: torch.Tensor  # (>= k,)
    V: torch.Tensor  # (n, k)
    energy: float

    @property
    def k(self) -> int:
        return int(self.U.shape[1])

    def truncate(self, k: int) -> "Basis":
        if k > self.k:
            raise ValueError(f"basis holds {self.k} vectors, {k} asked")
        return Basis(self.U[:, :k], self.S, self.V[:, :k], self.energy)

    def gap(self) -> float | None:
        """sigma_k / sigma_{k+1}: how well separated the subspace boundary is (None at the end)."""
        k = self.k
        if k == 0 or k >= self.S.numel() or float(self.S[k]) == 0.0:
            return None
        return float(self.S[k - 1] / self.S[k])


truncated_svd = Op("truncated_svd", "top-k left/right singular vectors and the spectrum of W")


@truncated_svd.register("reference", reference=True)
def _svd_reference(W: torch.Tensor, k: int | None = None, dtype: torch.dtype = torch.float64) -> Basis:
    """Full torch.linalg.svd (what existing tools do), in `dtype` (float64 by default)."""
    W = W.to(dtype)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = S.numel() if k is None else min(k, S.numel())
    return Basis(U[:, :k], S, Vh[:k].T, float((S.double() ** 2).sum()))


def problem_for(W: torch.Tensor, k: int | None = None) -> Problem:
    return Problem(device=W.device.type, dtype=str(W.dtype).removeprefix("torch."),
                   shape=tuple(W.shape[-2:]), batch=int(W.shape[0]) if W.dim() == 3 else 1, k=k)
