"""truncated_svd: the top-k singular subspaces of a weight, plus as much of its spectrum as the
backend knows.

k may be an int, None (all), or a chooser called with (spectrum, energy) once the spectrum is
known, so that energy-based k costs no second pass (ops/kspec.py). Backends accept one matrix
(m, n) or a batch (b, m, n) of same-shape matrices with one k spec per matrix.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .eigh_topk import Eig, topk_eigh
from .gram import gram_matrix
from .host import Clock, timed
from .kspec import KChooser, KSpec, as_batch, resolve_k  # noqa: F401  (re-exported: their old home)
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
    solver: str = ""  # what computed the basis (the eigensolver path of a Gram backend; "" when not told)

    @property
    def k(self) -> int:
        return int(self.U.shape[1])

    def truncate(self, k: int) -> "Basis":
        if k > self.k:
            raise ValueError(f"basis holds {self.k} vectors, {k} asked")
        return Basis(self.U[:, :k], self.S, self.V[:, :k], self.energy, self.solver)

    def columns(self) -> "Basis":
        """The same basis with U and V column-major (U^T, V^T contiguous): the layout the cache
        stores and truncation keeps, made the one layout for every source (computed, cached,
        truncated) so that the thin products give the same bits whichever it came from."""
        return Basis(_column_major(self.U), self.S, _column_major(self.V), self.energy, self.solver)

    def gap(self) -> float | None:
        """sigma_k / sigma_{k+1}: how well separated the subspace boundary is (None at the end)."""
        k = self.k
        if k == 0 or k >= self.S.numel() or float(self.S[k]) == 0.0:
            return None
        return float(self.S[k - 1] / self.S[k])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Basis":
        """The same basis with `fn` applied to U, S and V (a move to a device, pinning)."""
        return Basis(fn(self.U), fn(self.S), fn(self.V), self.energy, self.solver)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.S, self.V))


def _column_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.T.is_contiguous() else t.T.contiguous().T


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


@truncated_svd.register("gram", priority=10, extras=("warm", "eig", "clock"), host_threads=True)
def _svd_gram(W: torch.Tensor, k: KSpec | Sequence[KSpec] = None, dtype: torch.dtype | None = None,
              warm: Sequence[torch.Tensor | None] | None = None, eig: str | None = None,
              clock: Clock | None = None) -> Basis | list[Basis]:
    """Gram matrix of the smaller side (fp32 accumulation from fp16/bf16; on a CPU its lower block
    triangle only, mirrored: gram_matrix), the truncated eigensolver (topk_eigh, dispatched on the
    Gram problem, or `eig` when forced) for its top k eigenvectors, the other side recovered as
    W^T U / S for the k vectors kept. `warm` gives each matrix a start for an iterative eigensolver
    (the other model's basis on the Gram side); `clock` collects seconds per phase.

    On a CPU the matrices of a batch are computed one by one, so a layer's basis does not depend on
    which layers share its batch (chunking never changes an answer); the engine runs them on host
    threads, one BLAS thread each (host_threads). On a GPU: one batched product and eigensolver call.
    """
    Wb, ks, batched = as_batch(W, k)
    dt = dtype or torch.float32
    warms = list(warm) if warm is not None else [None] * Wb.shape[0]
    if Wb.is_cuda:
        out = _gram_batched(Wb, ks, dt, warms, eig, clock)
    else:
        out = [_gram_one(Wi, ki, dt, wi, eig, clock) for Wi, ki, wi in zip(Wb, ks, warms)]
    return out if batched else out[0]


def eig_backend(G: torch.Tensor, ks: Sequence[KSpec], override: str | None):
    """The topk_eigh backend for a Gram problem (b, d, d) or (d, d)."""
    k = ks[0] if len(ks) == 1 and isinstance(ks[0], int) else None
    problem = Problem(device=G.device.type, dtype=str(G.dtype).removeprefix("torch."), shape=tuple(G.shape[-2:]),
                      batch=int(G.shape[0]) if G.dim() == 3 else 1, k=k)
    return topk_eigh.choose(problem, override).backend


def _gram_one(W: torch.Tensor, k: KSpec, dtype: torch.dtype, warm: torch.Tensor | None, eig: str | None,
              clock: Clock | None) -> Basis:
    with timed(clock, "gram"):
        W = W.to(dtype)
        wide = W.shape[0] <= W.shape[1]
        A = W.T if wide else W  # (L, d): G = A^T A
        G = gram_matrix(A)
    with timed(clock, "eigensolver"):
        e = eig_backend(G, [k], eig).fn(G, k, warm=None if warm is None else [warm])
    del G
    with timed(clock, "recover"):
        return _finish(A, e, wide)


@contextlib.contextmanager
def _exact_tf32(dtype: torch.dtype):
    """On a GPU, TF32 tensor-core products for a Gram matrix of float16/bfloat16 weights: their
    values are exactly representable in TF32 (10-bit mantissa, float32's exponent range) and the
    products accumulate in float32, so the product is as exact as a float32 one (mixed precision
    the contract allows). Any other dtype keeps full float32 products."""
    flag = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype in (torch.float16, torch.bfloat16)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


def _gram_batched(Wb: torch.Tensor, ks: list[KSpec], dtype: torch.dtype, warms: list, eig: str | None,
                  clock: Clock | None) -> list[Basis]:
    wide = Wb.shape[1] <= Wb.shape[2]
    with timed(clock, "gram"), _exact_tf32(Wb.dtype):
        W = Wb.to(dtype)
        A = W.mT if wide else W
        G = A.mT @ A
    with timed(clock, "eigensolver"):
        eigs = eig_backend(G, ks, eig).fn(G, ks, warm=warms)
    del G
    with timed(clock, "recover"):
        return [_finish(A[i], e, wide) for i, e in enumerate(eigs)]


def _finish(A: torch.Tensor, e: Eig, wide: bool) -> Basis:
    """Basis from the top-k eigenvectors Q of G = A^T A: the other side is A Q / S."""
    Q, S = e.vectors.to(A.dtype), e.spectrum().to(A.dtype)  # S on the host for a GPU batch (on_host)
    Sk = e.top().to(A.dtype)  # on A's device
    inv = torch.where(Sk > 0, 1.0 / Sk, torch.zeros_like(Sk))
    other = (A @ Q) * inv
    if wide:
        return Basis(Q, S, other, e.trace, e.solver)
    return Basis(other, S, Q, e.trace, e.solver)
