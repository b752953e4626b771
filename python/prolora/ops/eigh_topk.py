"""topk_eigh: the truncated symmetric eigensolver behind every Gram basis. The top-k eigenpairs of
a symmetric positive semidefinite matrix G = A^T A, with k given or chosen from the spectrum (the
energy rule: the chooser sees sqrt(eigenvalues), the singular values of A, and trace(G), which is
||A||_F^2 and free), so that a transfer pays only for the basis it keeps.

Backends (all return `Eig`, eigenpairs in descending order):
- `reference`: float64 `torch.linalg.eigh`, every eigenpair.
- `eigh`: `torch.linalg.eigh` in G's dtype (float32): LAPACK syevd (MKL in torch's CPU wheels) or
  cuSOLVER, one batched call on a GPU. Computes every eigenvector, keeps k.
- `lapack`: LAPACK's subset path through scipy (the tridiagonal reduction sytrd once, all
  eigenvalues of the tridiagonal matrix with sterf in O(d^2), k from them, then only the k
  eigenvectors wanted with the MRRR solver stemr, back-transformed by torch.ormqr).
- `subspace` (ops/eigh_subspace.py): block subspace iteration warm-started from the other model's
  basis, stopped by a residual certificate, falling back to `eigh` where it cannot certify.

Which is the default is decided by measurement (see `prefer_*` below and docs/performance.md).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from .kspec import KSpec, as_batch, resolve_k
from .registry import Op, Problem


@dataclass
class Eig:
    """Top-k eigenpairs of one symmetric PSD matrix (descending order)."""

    values: torch.Tensor  # all d eigenvalues where the solver computed them, else the p >= k it knows
    vectors: torch.Tensor  # (d, k)
    trace: float  # trace(G) = ||A||_F^2 for G = A^T A
    solver: str = "eigh"  # what computed it; "eigh (fallback: why)" when an iterative solver gave up
    iterations: int = 0
    # the top-k singular values on the vectors' device, where `values` were copied to the host (a
    # GPU batch: the host chooses k and only the host reads the spectrum); None: from `values`
    device_top: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.vectors.shape[1])

    def spectrum(self) -> torch.Tensor:
        """sqrt of the eigenvalues: for a Gram matrix, the singular values of its factor."""
        return self.values.clamp_min(0).sqrt()

    def top(self) -> torch.Tensor:
        """The k largest singular values where the vectors live (no copy between devices)."""
        return self.device_top if self.device_top is not None else self.spectrum()[:self.k]

    @property
    def fell_back(self) -> bool:
        return "fallback" in self.solver


Warm = "Sequence[torch.Tensor | None] | None"

topk_eigh = Op("topk_eigh", "top-k eigenpairs of a symmetric PSD (Gram) matrix, k given or from the spectrum")


def traces(Gb: torch.Tensor, trace: Sequence[float] | None) -> list[float]:
    """trace of each matrix of the batch (float64 sum; one host read for the batch)."""
    if trace is not None:
        return [float(t) for t in trace]
    return Gb.diagonal(dim1=-2, dim2=-1).double().sum(-1).tolist()


def from_ascending(evals: torch.Tensor, evecs: torch.Tensor, k: KSpec, trace: float, solver: str) -> Eig:
    """Eig from one matrix's full eigendecomposition in ascending order (as eigh returns it)."""
    values = evals.flip(-1)
    kk = resolve_k(k, values.clamp_min(0).sqrt(), trace)
    return Eig(values, evecs[:, evecs.shape[1] - kk:].flip(-1), trace, solver)


def on_host(Gb: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, ks: Sequence[KSpec],
            trace: Sequence[float] | None, solver: str) -> list[Eig]:
    """Eigs of a device batch's full eigendecompositions (ascending): the traces and spectra come to
    the host in one copy (float64, d + 1 per matrix; k is chosen there), so the device waits once per
    batch, not per matrix; the vectors and the top-k singular values stay on the device."""
    values = evals.flip(-1)
    parts = [values.double()]
    if trace is None:  # trace(G) from the device, in the same copy
        parts.insert(0, Gb.diagonal(dim1=-2, dim2=-1).double().sum(-1)[:, None])
    host = torch.cat(parts, dim=1).cpu()
    if trace is None:
        trs, host = host[:, 0].tolist(), host[:, 1:]
    else:
        trs = [float(t) for t in trace]
    vals = host.to(values.dtype)
    sv = values.clamp_min(0).sqrt()
    out = []
    for i in range(Gb.shape[0]):
        kk = resolve_k(ks[i], vals[i].clamp_min(0).sqrt(), trs[i])
        out.append(Eig(vals[i], evecs[i][:, evecs.shape[-1] - kk:].flip(-1), trs[i], solver, device_top=sv[i, :kk]))
    return out


@topk_eigh.register("reference", reference=True)
def _reference(G: torch.Tensor, k: KSpec | Sequence[KSpec] = None, trace: Sequence[float] | None = None,
               warm: Warm = None) -> Eig | list[Eig]:
    """float64 eigh of every matrix, all eigenpairs computed, the top k kept."""
    Gb, ks, batched = as_batch(G, k)
    out = []
    for Gi, ki, tr in zip(Gb, ks, traces(Gb, trace)):
        evals, evecs = torch.linalg.eigh(Gi.double())
        out.append(from_ascending(evals, evecs, ki, tr, "reference"))
    return out if batched else out[0]


@topk_eigh.register("eigh", priority=10)
def _eigh(G: torch.Tensor, k: KSpec | Sequence[KSpec] = None, trace: Sequence[float] | None = None,
          warm: Warm = None) -> Eig | list[Eig]:
    """torch.linalg.eigh in G's dtype: one batched call on a GPU, one matrix at a time on a CPU
    (so that a matrix's answer does not depend on its batch mates)."""
    Gb, ks, batched = as_batch(G, k)
    if Gb.is_cuda:
        out = on_host(Gb, *torch.linalg.eigh(Gb), ks, trace, "eigh")
    else:
        out = []
        for Gi, ki, tr in zip(Gb, ks, traces(Gb, trace)):
            evals, evecs = torch.linalg.eigh(Gi)
            out.append(from_ascending(evals, evecs, ki, tr, "eigh"))
    return out if batched else out[0]


# ----------------------------------------------------------------------------- LAPACK subset path


@functools.lru_cache(maxsize=1)
def _scipy_missing() -> str | None:
    try:
        from scipy.linalg import lapack  # noqa: F401
    except ImportError as e:
        return f"scipy is not installed ({e}); pip install scipy"
    return None


def _check_lapack(p: Problem) -> str | None:
    if p.device != "cpu":
        return "LAPACK through scipy runs on the host only"
    if p.dtype not in ("float32", "float64"):
        return f"dtype {p.dtype}: the Gram matrix is float32 or float64"
    return None


def prefer_lapack(p: Problem) -> str | None:
    """Why the subset path is not the default (measured on this project's 2-core CPU)."""
    return ("measured slower than eigh here: scipy's LAPACK (OpenBLAS, reference sytrd) tridiagonalises "
            "d=1280 in 1.4x the time torch's MKL eigh takes for the whole decomposition, and MRRR for "
            "k ~ d/2 vectors costs more than the divide-and-conquer it replaces (docs/performance.md)")


@topk_eigh.register("lapack", priority=5, check=_check_lapack, available=_scipy_missing, measured=prefer_lapack)
def _lapack(G: torch.Tensor, k: KSpec | Sequence[KSpec] = None, trace: Sequence[float] | None = None,
            warm: Warm = None) -> Eig | list[Eig]:
    """One tridiagonal reduction, all eigenvalues from it (O(d^2)), k from them, and only the k
    eigenvectors wanted. Where MRRR reports a failure the matrix goes to eigh (said in `solver`)."""
    from .host import blas_threads

    Gb, ks, batched = as_batch(G, k)
    with blas_threads(1):  # one matrix per thread: layers run concurrently instead (ops/host.py)
        out = [_lapack_one(Gi, ki, tr) for Gi, ki, tr in zip(Gb, ks, traces(Gb, trace))]
    return out if batched else out[0]


def _lapack_one(G: torch.Tensor, k: KSpec, trace: float) -> Eig:
    import numpy as np
    from scipy.linalg import lapack

    single = G.dtype == torch.float32
    sytrd, sterf, stemr = ((lapack.ssytrd, lapack.ssterf, lapack.sstemr) if single else
                           (lapack.dsytrd, lapack.dsterf, lapack.dstemr))
    d = G.shape[0]
    if d < 2:
        return from_ascending(*torch.linalg.eigh(G), k, trace, "eigh")
    c, diag, off, tau, info = sytrd(G.contiguous().numpy(), lower=1)
    if info != 0:
        return from_ascending(*torch.linalg.eigh(G), k, trace, f"eigh (fallback: sytrd info {info})")
    evals, info = sterf(diag.copy(), off.copy())
    if info != 0:
        return from_ascending(*torch.linalg.eigh(G), k, trace, f"eigh (fallback: sterf info {info})")
    values = torch.from_numpy(evals.copy()).flip(0)
    kk = resolve_k(k, values.clamp_min(0).sqrt(), trace)
    if kk == 0:
        return Eig(values, G.new_zeros(d, 0), trace, "lapack")
    m, _, z, info = stemr(diag, np.append(off, 0).astype(off.dtype), 3, 0, 0, d - kk + 1, d)
    if info != 0 or m != kk:
        return from_ascending(*torch.linalg.eigh(G), k, trace, f"eigh (fallback: stemr info {info}, {m} of {kk})")
    Z = torch.from_numpy(np.ascontiguousarray(z[:, :m][:, ::-1]))
    # Q = H(1) ... H(d-1) from sytrd (lower): the reflectors of a QR of c[1:, :-1], acting on rows 1..d-1
    X = Z.clone()
    X[1:] = torch.ormqr(torch.from_numpy(c)[1:, :-1], torch.from_numpy(tau), Z[1:], left=True, transpose=False)
    return Eig(values, X, trace, "lapack")
