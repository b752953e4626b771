"""How many directions a basis keeps (k), shared by the truncated SVD and the truncated
eigensolver: an int, None (all), or a chooser called with (spectrum, energy) once the spectrum is
known, so that an energy-based k costs no second pass. For a Gram matrix G = A^T A the spectrum a
chooser sees is the singular values of A, sqrt(eigenvalues of G), and the energy is trace(G)."""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

KChooser = Callable[[torch.Tensor, float], int]
KSpec = Union[int, None, KChooser]


def resolve_k(k: KSpec, S: torch.Tensor, energy: float) -> int:
    d = S.numel()
    if k is None:
        return d
    if callable(k):
        k = k(S, energy)
    return max(0, min(int(k), d))


def as_batch(W: torch.Tensor, k: KSpec | Sequence[KSpec]) -> tuple[torch.Tensor, list[KSpec], bool]:
    """(b, m, n) view, one k spec per matrix, and whether the input was batched."""
    if W.dim() == 2:
        return W[None], [k], False
    ks = list(k) if isinstance(k, (list, tuple)) else [k] * W.shape[0]
    if len(ks) != W.shape[0]:
        raise ValueError(f"{len(ks)} k specs for a batch of {W.shape[0]}")
    return W, ks, True
