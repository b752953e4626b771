"""topk_eigh backend `subspace`: block subspace iteration with Rayleigh-Ritz, warm-started from
the other model's basis, stopped by a residual certificate, falling back to a dense eigh where it
cannot certify (the Eig says so: solver "eigh (fallback: why)").

The certificate. For orthonormal Ritz vectors X (d x k) with Ritz values theta and residual
R = G X - X diag(theta) (X^T R = 0), X spans an exact invariant subspace of G + E with
E = -(R X^T + X R^T), ||E||_F <= sqrt(2) ||R||_F: the answer is exact for a matrix within that
distance of G. The dense float32 solver whose bases the accuracy contract was measured with (merged
dW within 1e-3 of float64, the same gate decisions) is exact for a matrix within about
0.5 u sqrt(d) ||G||_F of G (measured: 0.65e-6 .. 1.03e-6 relative for d = 320 .. 1280, u = 2^-24),
and forming G in float32 has already moved it by about 0.25e-6 relative. So the iteration stops
when sqrt(2) ||R_k||_F <= TOL u sqrt(d) ||G||_F (R computed in float64; TOL = 2, about twice the
dense solver's own backward error, a float32 floor Ritz vectors also meet): a basis about as far
from the exact one as the dense float32 solver's, whatever the spectrum does at k (no gap,
clusters), hence the same contract. The Ritz values are then eigenvalues of G + E, so the energy rule picks k
from them as it would from the dense solver's; a short power iteration on the complement of the
block checks that no eigenvalue above the k-th was missed.

The budget. A step costs about 2 d^2 p (G X) + 6 d p^2 (QR, Rayleigh-Ritz products) + 11 p^3
(the p x p eigensolver) in products of GEMM speed; a dense solve about DENSE_COST d^3 (measured:
eigh of 1280 x 1280 in float32 on one core takes as long as 5.6 GEMMs of that size). The solver
takes at most as many steps as a dense solve costs (at most MAX_STEPS): with k near d/2, as the
energy rule gives on trained-like spectra, that is under MIN_STEPS and it falls back before the
first step, wasting nothing. Subspace iteration converges like (lambda_{p+1} / lambda_k)^steps
(p: the block, k plus oversampling); after two steps the observed residual ratio predicts the
steps still needed, and when they exceed the budget it stops and falls back.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import measured
from .eigh_topk import Eig, Warm, from_ascending, topk_eigh, traces
from .kspec import KSpec, as_batch, resolve_k
from .registry import Problem

TOL = 2.0  # certificate: sqrt(2) ||R_k||_F <= TOL * u * sqrt(d) * ||G||_F
DENSE_COST = 11.0  # a dense eigh of d x d in d^3 multiply-adds at GEMM speed (measured, see the module doc)
MAX_STEPS = 60
MIN_STEPS = 3  # fewer affordable steps than this: fall back before starting
OVERSAMPLE = 0.1  # extra block columns, a share of k (at least MIN_EXTRA)
MIN_EXTRA = 8
_SEED = 0x5EED


def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def _fallback(G: torch.Tensor, k: KSpec, trace: float, why: str, steps: int = 0) -> Eig:
    evals, evecs = torch.linalg.eigh(G)
    e = from_ascending(evals, evecs, k, trace, f"eigh (fallback: {why})")
    e.iterations = steps
    return e


def _complement_top(G: torch.Tensor, X: torch.Tensor, gen: torch.Generator, steps: int = 4) -> float:
    """Estimate of the largest eigenvalue of G on the orthogonal complement of span(X)."""
    v = torch.randn(G.shape[0], 1, generator=gen, dtype=torch.float64).to(G.device, G.dtype)
    nu = 0.0
    for _ in range(steps):
        v = v - X @ (X.T @ v)
        n = float(v.norm())
        if n == 0.0:
            return 0.0
        v = v / n
        w = G @ v
        nu = float((v.T @ w).squeeze())
        v = w
    return nu


def step_budget(d: int, p: int) -> int:
    """How many steps cost as much as a dense solve (see the module doc), at most MAX_STEPS."""
    step = 2 * d * d * p + 6 * d * p * p + 11 * p ** 3
    return int(min(MAX_STEPS, DENSE_COST * d ** 3 / step))


def solve_one(G: torch.Tensor, k: KSpec, trace: float, warm: torch.Tensor | None,
              max_steps: int | None = None) -> Eig:
    """Top-k eigenpairs of one symmetric PSD matrix G by warm-started subspace iteration (see the
    module doc), or a dense eigh with the reason it was needed."""
    d = G.shape[0]
    if warm is None and not isinstance(k, int):
        return _fallback(G, k, trace, "no warm start for a k chosen from the spectrum")
    k0 = k if isinstance(k, int) else int(warm.shape[1])
    k0 = max(1, min(k0, d))
    p = min(d, k0 + max(MIN_EXTRA, math.ceil(OVERSAMPLE * k0)))
    max_steps = step_budget(d, p) if max_steps is None else max_steps
    if max_steps < MIN_STEPS:
        return _fallback(G, k, trace, f"block {p} of {d}: {max_steps} steps cost a dense solve")
    gen = torch.Generator().manual_seed(_SEED + d)
    start = torch.randn(d, p, generator=gen, dtype=torch.float64).to(G.device, G.dtype)
    if warm is not None:
        j = min(int(warm.shape[1]), p)
        start[:, :j] = warm[:, :j].to(G.device, G.dtype)
    X = torch.linalg.qr(start).Q
    norm = float(G.double().norm())
    tol = TOL * _unit_roundoff(G.dtype) * math.sqrt(d) * norm
    prev = None
    G64 = None
    for step in range(1, max_steps + 1):
        Y = G @ X
        H = X.T @ Y
        theta, S = torch.linalg.eigh((H + H.T) / 2)
        theta, S = theta.flip(0), S.flip(1)
        X, Y = X @ S, Y @ S
        kk = resolve_k(k, theta.clamp_min(0).sqrt(), trace)
        if kk <= 0 or kk >= p:
            return _fallback(G, k, trace, f"k not within the block of {p} (energy rule on {p} Ritz values)", step)
        err = math.sqrt(2) * float((Y[:, :kk] - X[:, :kk] * theta[:kk]).norm())
        if err <= 4 * tol:  # near the floor of float32 products: judge it in float64
            G64 = G.double() if G64 is None else G64
            Xk = X[:, :kk].double()
            err = math.sqrt(2) * float((G64 @ Xk - Xk * theta[:kk].double()).norm())
        if err <= tol:
            nu = _complement_top(G, X[:, :kk], gen)
            if nu > float(theta[kk - 1]):
                return _fallback(G, k, trace, f"an eigenvalue outside the block ({nu:.3g} > {float(theta[kk - 1]):.3g})",
                                 step)
            return Eig(theta, X[:, :kk].contiguous(), trace, "subspace", step)
        if prev is not None:
            rate = err / prev
            need = math.inf if rate >= 0.98 else step + math.log(tol / err) / math.log(rate)
            if need > max_steps:
                return _fallback(G, k, trace, f"residual {err / norm:.1e} of ||G|| after {step} steps, "
                                 f"rate {rate:.2f}/step: {need:.0f} steps needed", step)
        prev = err
        X = torch.linalg.qr(Y).Q
    return _fallback(G, k, trace, f"not certified in {max_steps} steps", max_steps)


def _check(p: Problem) -> str | None:
    if p.dtype not in ("float32", "float64"):
        return f"dtype {p.dtype}: the Gram matrix is float32 or float64"
    return None


def prefer_subspace(p: Problem) -> str | None:
    """Where the iterative solver is the default: nowhere on a CPU (measured), on a GPU where the
    measured-winners table says so."""
    if p.device.startswith("cuda"):
        return measured.verdict("topk_eigh", "subspace", p)
    return ("measured slower than eigh on this CPU for energy:0.9 on trained-like spectra (k ~ d/2, "
            "sigma_k/sigma_(k+1) ~ 1.001): it needs far more steps than a dense solve costs and falls back; "
            "it pays where k is small or the spectrum has a gap at k")


@topk_eigh.register("subspace", priority=8, check=_check, measured=prefer_subspace)
def _subspace(G: torch.Tensor, k: KSpec | Sequence[KSpec] = None, trace: Sequence[float] | None = None,
              warm: Warm = None) -> Eig | list[Eig]:
    """Warm-started block subspace iteration with a residual certificate, one matrix at a time."""
    Gb, ks, batched = as_batch(G, k)
    warms = list(warm) if warm is not None else [None] * Gb.shape[0]
    out = [solve_one(Gi, ki, tr, wi) for Gi, ki, tr, wi in zip(Gb, ks, traces(Gb, trace), warms)]
    return out if batched else out[0]
