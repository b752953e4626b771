"""truncated_svd: the top-k singular subspaces of a weight, plus as much of its spectrum as the
backend knows.

k may be an int, None (all), or a chooser called with (spectrum, energy) once the spectrum is
known, so that energy-based k costs no second pass. Backends accept one matrix (m, n) or a batch
(b, m, n) of same-shape matrices with one k spec per matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from .registry import Op


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

    def columns(self) -> "Basis":
        """The same basis with U and V column-major (U^T, V^T contiguous): the layout the cache
        stores and truncation keeps, made the one layout for every source (computed, cached,
        truncated) so that the thin products give the same bits whichever it came from."""
        return Basis(_column_major(self.U), self.S, _column_major(self.V), self.energy)

    def gap(self) -> float | None:
        """sigma_k / sigma_{k+1}: how well separated the subspace boundary is (None at the end)."""
        k = self.k
        if k == 0 or k >= self.S.numel() or float(self.S[k]) == 0.0:
            return None
        return float(self.S[k - 1] / self.S[k])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Basis":
        """The same basis with `fn` applied to U, S and V (a move to a device, pinning)."""
        return Basis(fn(self.U), fn(self.S), fn(self.V), self.energy)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.S, self.V))


def _column_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.T.is_contiguous() else t.T.contiguous().T


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


truncated_svd = Op("truncated_svd", "top-k left/right singular vectors and the spectrum of W")


@truncated_svd.register("reference", reference=True)
def _svd_reference(W: torch.Tensor, k: KSpec | Sequence[KSpec] = None,
                   dtype: torch.dtype | None = None) -> Basis | list[Basis]:
    """Full torch.linalg.svd per matrix (what existing tools do), in float64 unless told."""
    Wb, ks, batched = as_batch(W, k)
    out = []
    for Wi, ki in zip(Wb, ks):
        U, S, Vh = torch.linalg.svd(Wi.to(dtype or torch.float64), full_matrices=False)
        energy = float((S.double() ** 2).sum())
        kk = resolve_k(ki, S, energy)
        out.append(Basis(U[:, :kk], S, Vh[:kk].T, energy))
    return out if batched else out[0]


@truncated_svd.register("svd", priority=1)
def _svd_full(W: torch.Tensor, k: KSpec | Sequence[KSpec] = None,
              dtype: torch.dtype | None = None) -> Basis | list[Basis]:
    """Full torch.linalg.svd per matrix in float32: the speed baseline of existing tools."""
    return _svd_reference(W, k, dtype=dtype or torch.float32)


@truncated_svd.register("gram", priority=10)
def _svd_gram(W: torch.Tensor, k: KSpec | Sequence[KSpec] = None,
              dtype: torch.dtype | None = None) -> Basis | list[Basis]:
    """Gram matrix of the smaller side (fp32 accumulation from fp16/bf16), symmetric
    eigensolver, the other side recovered as W^T U / S for the k vectors kept.

    Matrices of a batch are computed one by one, so a layer's basis does not depend on which
    layers share its batch (chunking never changes an answer); batching gains little on a CPU.
    """
    Wb, ks, batched = as_batch(W, k)
    if Wb.is_cuda:  # one batched GEMM and eigensolver call on the GPU
        out = _gram_batched(Wb.to(dtype or torch.float32), ks)
    else:
        out = [_gram_one(Wi.to(dtype or torch.float32), ki) for Wi, ki in zip(Wb, ks)]
    return out if batched else out[0]


def _gram_batched(Wb: torch.Tensor, ks: list[KSpec]) -> list[Basis]:
    """The whole batch in one product and one eigensolver call; the spectra and energies come
    to the host in one copy (k is chosen there), so the device waits once per batch, not per
    matrix. The bases keep their spectra on the host (only the host reads them)."""
    wide = Wb.shape[1] <= Wb.shape[2]
    G = Wb @ Wb.mT if wide else Wb.mT @ Wb
    energy = G.diagonal(dim1=-2, dim2=-1).double().sum(-1)
    evals, evecs = torch.linalg.eigh(G)
    del G
    S_all = evals.flip(-1).clamp_min(0).sqrt()
    host = torch.cat([energy[:, None], S_all.double()], dim=1).cpu()
    energies, S_host = host[:, 0].tolist(), host[:, 1:].to(S_all.dtype)
    return [_finish(Wb[i], S_all[i], evecs[i], resolve_k(ks[i], S_host[i], energies[i]), energies[i], wide,
                    S_host[i]) for i in range(Wb.shape[0])]


def _gram_one(W: torch.Tensor, k: KSpec) -> Basis:
    m, n = W.shape
    wide = m <= n
    G = W @ W.T if wide else W.T @ W
    energy = float(G.diagonal().double().sum())
    evals, evecs = torch.linalg.eigh(G)
    del G
    return _finish(W, evals.flip(-1).clamp_min(0).sqrt(), evecs, k, energy, wide)


def _finish(W: torch.Tensor, S: torch.Tensor, evecs: torch.Tensor, k: KSpec, energy: float, wide: bool,
            keep: torch.Tensor | None = None) -> Basis:
    """Keep the top-k eigenvectors (ascending order from eigh) and recover the other side.
    `keep`: the spectrum the basis holds, when not S itself (S's copy on the host)."""
    kk = resolve_k(k, S, energy)
    Q = evecs[:, evecs.shape[1] - kk:].flip(-1)
    inv = torch.where(S[:kk] > 0, 1.0 / S[:kk], torch.zeros_like(S[:kk]))
    S = S if keep is None else keep
    if wide:
        return Basis(Q, S, (W.T @ Q) * inv, energy)
    return Basis((W @ Q) * inv, S, Q, energy)
