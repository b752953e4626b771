"""Backends on the native module prolora._C (batched one-sided Jacobi SVD and Jacobi symmetric
eigensolver, csrc/): registered where they are the right tool, chosen only where measured to win.

CPU, measured here (2-core x86_64, one thread each, thread CPU time per matrix, square matrices,
min of 5 runs; benchmarks/bench_kernels.py reproduces the rows):
    SVD   n=4: Jacobi 1.1x (b=1) .. 3.7x (b=64) faster than LAPACK gesdd; n=8: 1.5x .. 2.3x;
          n=12: 1.5x .. 1.6x; n=16: 0.87-1.14x (a tie); n=32: 0.6x; n=64: 0.3x; n=128: 0.17x
          (float32; float64 alike up to 8, worse above).
    eigh  n=4: 0.9x (b=1), 1.7x (b=64); n=8: 0.8-0.9x; n=16: 0.4x; n=32: 0.26x; n=128: 0.06x
          against LAPACK syevd.
With all cores the Jacobi launcher also spreads a batch over threads, which torch's batched
svd does not, so these per-core figures are the conservative side. Hence on CPU: small_svd
"native" for matrices up to CPU_SVD_MAX x CPU_SVD_MAX, and never the Jacobi eigensolver for Gram
matrices (real layers have d >= 320, where LAPACK is > 15x faster).
On CUDA both are chosen only where the measured-winners table (ops.measured) says they win.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _native
from . import measured
from .gram_basis import bases_from_eigh, gram_operand, torch_recover
from .registry import Problem
from .small_svd import compute_dtype, small_svd
from .svd import Basis, KSpec, as_batch, truncated_svd

CPU_SVD_MAX = 12  # largest matrix side where the CPU Jacobi SVD beat LAPACK at every batch size
_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _native_missing() -> str | None:
    return _native.why_unavailable()


def _check_small_svd(p: Problem) -> str | None:
    if p.dtype not in _DTYPES:
        return f"dtype {p.dtype} not supported (float16/bfloat16 are solved in float32)"
    if p.device.startswith("cuda"):
        return _native.cuda_unavailable_reason()
    if p.device != "cpu":
        return f"device {p.device} not supported"
    return None


def _prefer_small_svd(p: Problem) -> str | None:
    """Where the native solver is the default: on CUDA where measured fastest, on CPU up to
    CPU_SVD_MAX (measured here)."""
    if p.device.startswith("cuda"):
        return measured.verdict("small_svd", "native", p)
    if not p.shape:
        return (f"chosen per shape: on CPU only up to {CPU_SVD_MAX}x{CPU_SVD_MAX}, where the "
                f"measured Jacobi SVD beats LAPACK (a tie at 16x16, it loses from 32x32 up)")
    if max(p.shape) > CPU_SVD_MAX:
        return (f"{p.shape[0]}x{p.shape[1]} > {CPU_SVD_MAX}x{CPU_SVD_MAX}: LAPACK gesdd is faster "
                f"there on CPU (measured: Jacobi ~1x at 16x16, 0.6x at 32x32, 0.17x at 128x128)")
    return None


@small_svd.register("native", priority=20, check=_check_small_svd, available=_native_missing,
                    measured=_prefer_small_svd)
def _small_svd_native(X: torch.Tensor, dtype: torch.dtype | None = None):
    """Batched one-sided Jacobi SVD (CPU threads over the batch, or one CUDA block per matrix)."""
    dt = compute_dtype(X, dtype)
    if dt not in (torch.float32, torch.float64):
        raise ValueError(f"native small_svd computes in float32 or float64, not {dt}")
    U, S, V = _native.batched_svd(X.to(dt), threads=torch.get_num_threads())
    return U, S, V.mT


def _check_gram_jacobi(p: Problem) -> str | None:
    if p.dtype not in _DTYPES[:3]:
        return f"dtype {p.dtype} not supported (float16/bfloat16/float32, computed in float32)"
    if p.device.startswith("cuda"):
        return _native.cuda_unavailable_reason()
    return None


def _prefer_gram_jacobi(p: Problem) -> str | None:
    if p.device.startswith("cuda"):
        return measured.verdict("truncated_svd", "gram-jacobi", p)
    return ("not on CPU: LAPACK syevd beats the Jacobi eigensolver from 8x8 up (measured 0.26x at "
            "32x32, 0.06x at 128x128) and real Gram matrices are 320x320 and larger")


@truncated_svd.register("gram-jacobi", priority=20, check=_check_gram_jacobi, available=_native_missing,
                        measured=_prefer_gram_jacobi)
def _svd_gram_jacobi(W: torch.Tensor, k: KSpec | Sequence[KSpec] = None,
                     dtype: torch.dtype | None = None) -> Basis | list[Basis]:
    """Gram matrices in float32 (torch, one matrix at a time), all eigendecompositions in one
    batched Jacobi call (one CUDA block per matrix), the other side recovered as W^T Q / S.
    Each matrix is computed alike whatever the batch, so chunking never changes an answer."""
    if dtype not in (None, torch.float32):
        raise ValueError(f"gram-jacobi computes in float32, not {dtype}")
    Wb, ks, batched = as_batch(W, k)
    A, wide = gram_operand(Wb)
    G = torch.stack([a.to(torch.float32).T @ a.to(torch.float32) for a in A]) if len(A) else \
        torch.empty(0, A.shape[2], A.shape[2], device=W.device)
    energies = G.diagonal(dim1=-2, dim2=-1).double().sum(-1).tolist()
    evals, evecs = _native.batched_eigh(G, threads=torch.get_num_threads())
    del G
    out = bases_from_eigh(evals, evecs, energies, ks, torch_recover(Wb, wide), wide)
    return out if batched else out[0]
