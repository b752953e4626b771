"""An adapter's dW written as a LoRA (up @ down) whose rank is chosen by an error bound.

Adapters that are not a low-rank pair (LoKr, LoHa, full differences, DoRA) are transferred as the
LoRA nearest to their effective dW: the truncated SVD, at the smallest rank whose relative
Frobenius error ||dW - up @ down|| / ||dW|| is within `Conversion.max_error` (or at a fixed rank,
`--rank N`, whatever its error). Nothing here forms an m x n matrix that the input does not
already imply at that size: Kronecker products are truncated from the SVDs of their two factors,
products of thin factors through QR of each side and the SVD of the small core.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import OptionError

# above this many elements a dense SVD runs in float32 (its error, ~1e-6 relative, is far below
# any bound); below, in float64
_F64_ELEMENTS = 1 << 22
DEFAULT_MAX_ERROR = 0.01


@dataclass(frozen=True)
class Conversion:
    """How an adapter's dW becomes a LoRA: the error bound, or a fixed rank that wins over it."""

    max_error: float = DEFAULT_MAX_ERROR
    rank: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.max_error, (int, float)) and 0.0 <= self.max_error < 1.0):
            raise OptionError(f"convert error {self.max_error!r}: must be in [0, 1)")
        if self.rank is not None and int(self.rank) < 1:
            raise OptionError(f"convert rank {self.rank!r}: must be a positive integer")

    def tighter(self, factor: float = 0.1) -> "Conversion":
        """The bound for an inner form that is combined with more later (DoRA's inner adapter)."""
        return Conversion(self.max_error * factor, None)

    def rank_for(self, S: torch.Tensor) -> tuple[int, float]:
        """(k, relative error at k) for singular values S (descending)."""
        s2 = S.double() ** 2
        total = float(s2.sum())
        n = int(S.numel())
        if total <= 0.0 or n == 0:
            return 1, 0.0
        # tail[k] = sum of s2[k:], the squared error of keeping k
        tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]).tolist() + [0.0]
        if self.rank is not None:
            k = min(int(self.rank), n)
        else:
            limit = (self.max_error ** 2) * total
            k = next((i for i in range(1, n + 1) if tail[i] <= limit), n)
        return k, math.sqrt(max(tail[k], 0.0) / total)


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = S[:k].clamp_min(0).sqrt().to(U.dtype)
    return (U[:, :k] * root).float(), (root[:, None] * Vh[:k]).float()


def from_dense(dW: torch.Tensor, conv: Conversion) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up [m, k], down [k, n], relative error) of a dense m x n dW."""
    dtype = torch.float64 if dW.numel() <= _F64_ELEMENTS else torch.float32
    U, S, Vh = torch.linalg.svd(dW.to(dtype), full_matrices=False)
    k, err = conv.rank_for(S)
    up, down = _split(U, S, Vh, k)
    return up, down, err


def from_factors(up: torch.Tensor, down: torch.Tensor, conv: Conversion) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncate up [m, R] @ down [R, n] (any R) by the bound, without forming m x n unless R is
    at least the smaller side (then the dense SVD is the cheaper one)."""
    m, R = up.shape
    n = down.shape[1]
    if R >= min(m, n):
        return from_dense(up.double() @ down.double(), conv)
    Q1, R1 = torch.linalg.qr(up.double())
    Q2, R2 = torch.linalg.qr(down.double().T)
    Uc, S, Vch = torch.linalg.svd(R1 @ R2.T)
    k, err = conv.rank_for(S)
    root = S[:k].clamp_min(0).sqrt()
    return ((Q1 @ Uc[:, :k]) * root).float(), (root[:, None] * (Vch[:k] @ Q2.T)).float(), err


def kron_lowrank(w1: torch.Tensor, w2: torch.Tensor, scale: float,
                 conv: Conversion) -> tuple[torch.Tensor, torch.Tensor, float]:
    """scale * kron(w1 [a, c], w2 [b, d]) truncated by the bound, from the SVDs of the two factors:
    kron(A, B) = sum_ij s_i t_j kron(u_i, x_j) kron(v_i, y_j)^T, so its singular values are the
    products s_i t_j and its best rank-k form keeps the k largest (never forms ab x cd)."""
    U1, S1, V1 = torch.linalg.svd(w1.double(), full_matrices=False)
    U2, S2, V2 = torch.linalg.svd(w2.double(), full_matrices=False)
    prod = (S1[:, None] * S2[None, :]).flatten() * abs(scale)
    order = torch.argsort(prod, descending=True)
    k, err = conv.rank_for(prod[order])
    pick = order[:k]
    i, j = pick // S2.numel(), pick % S2.numel()
    root = prod[pick].sqrt()
    sign = -1.0 if scale < 0 else 1.0
    # column (i, j) of the left factor is kron(U1[:, i], U2[:, j]): (a, 1, k) * (1, b, k) -> (a*b, k)
    up = (U1[:, i][:, None, :] * U2[:, j][None, :, :]).reshape(-1, k) * (root * sign)
    down = (V1[i][:, :, None] * V2[j][:, None, :]).reshape(k, -1) * root[:, None]
    return up.float(), down.float(), err


def khatri_rao(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a1 @ b1) * (a2 @ b2) (elementwise) as one product up @ down of rank r1 * r2: up's column
    (i, j) is a1[:, i] * a2[:, j], down's row (i, j) is b1[i] * b2[j]. Exact."""
    m, n = a1.shape[0], b1.shape[1]
    up = (a1.double()[:, :, None] * a2.double()[:, None, :]).reshape(m, -1)
    down = (b1.double()[:, None, :] * b2.double()[None, :, :]).reshape(-1, n)
    return up, down
