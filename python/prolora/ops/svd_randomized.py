"""truncated_svd backend "randomized": a randomized range finder with oversampling and power
(subspace) iterations (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1), batched over
same-shape matrices.

Why: extraction (W_tuned - W_base, rank r much smaller than min(m, n)) needs only the top r
singular triplets. A full SVD computes all min(m, n) of them; the range finder costs a few
(m x n) @ (n x l) products with l = r + oversampling, a thin QR per product and one SVD of an
(l x n) matrix.

Accuracy contract (tested against the float64 exact SVD, tests/ops/test_svd_randomized.py): per matrix,
the Frobenius error of the rank-r approximation is within 1% of the optimal (exact SVD) error,
and the top-r subspaces agree (phi >= 0.999) where the spectral gap sigma_r / sigma_{r+1} allows.

Dispatch: eligible only for a problem that names a small integer k (k + oversampling at most a
third of min(m, n), and min(m, n) >= MIN_DIM). Problems without k (energy-chosen bases, as a
transfer asks for) are refused, so a transfer keeps its backends and its bytes.

The random test matrix comes from a generator seeded with the matrix shape, k and the position
in the batch: the same input gives the same answer in every run.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .registry import Problem
from .svd import Basis, KSpec, as_batch, truncated_svd

NAME = "randomized"
MIN_DIM = 256  # below this a full SVD is a few milliseconds: not worth an approximation
POWER_ITERATIONS = 6  # at most; the error estimate usually stops it after 2-4 (see randomized_svd)
STOP_TOL = 0.01  # stop once a power step lowers the rank-k error^2 by at most 1% of itself
_NOISE = 1e-9  # error^2 changes below this share of ||W||^2 are float32 round-off, not progress
SEED = 0x5EED


def oversampling(k: int) -> int:
    """Extra columns of the range finder: 10 (Halko et al.'s default) or k/4 for large k."""
    return max(10, k // 4)


def check(problem: Problem) -> str | None:
    """None when `problem` is a small-rank truncated SVD this backend is meant for, else why not."""
    if problem.k is None or isinstance(problem.k, bool) or not isinstance(problem.k, int):
        return "needs an explicit small integer k (energy-chosen bases need the whole spectrum)"
    if len(problem.shape) < 2:
        return "needs the matrix shape"
    d = min(problem.shape[-2:])
    if d < MIN_DIM:
        return f"min(m, n) = {d} < {MIN_DIM}: an exact SVD is as cheap"
    if problem.k < 1:
        return "k < 1"
    if 3 * (problem.k + oversampling(problem.k)) > d:
        return f"k = {problem.k} is not small relative to min(m, n) = {d}"
    return None


def _cholqr(Y: torch.Tensor) -> torch.Tensor | None:
    """One Cholesky QR pass: Q = Y R^-1 with R^T R = Y^T Y, the l x l Gram matrix, its Cholesky
    factor and R^-1 in float64, the product Y R^-1 (the only large step) in Y's dtype. None if
    Y^T Y is not numerically positive definite (Y of lower rank than its columns)."""
    Yd = Y.double()
    L, info = torch.linalg.cholesky_ex(Yd.mT @ Yd)
    if bool((info != 0).any()):
        return None
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    Rinv = torch.linalg.solve_triangular(L.mT, eye, upper=True)  # (L^T)^-1
    return Y @ Rinv.to(Y.dtype)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of each matrix of a batch.

    CholeskyQR2 (two Cholesky QR passes, the Gram matrices in float64): GEMMs and an l x l
    Cholesky instead of a Householder QR, which on this CPU costs ~0.1-0.2 s for a 1280 x 80
    matrix (half of a whole randomized SVD). In float64 the first pass is accurate for
    cond(Y) up to ~1e7 and the second restores orthogonality to round-off; a Y of lower rank
    than its columns (an exactly low-rank W) falls back to Householder QR."""
    Q = _cholqr(Y)
    if Q is not None:
        Q = _cholqr(Q)
    if Q is None:
        return torch.linalg.qr(Y, mode="reduced").Q
    return Q


def randomized_svd(Wb: torch.Tensor, k: int, power: int = POWER_ITERATIONS, over: int | None = None,
                   seed: int = SEED, tol: float | None = STOP_TOL,
                   energy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (b, m, l), S (b, l), V (b, n, l)) of a batch Wb (b, m, n), l = k + oversampling,
    clipped to min(m, n). The leading k columns are the approximate top-k singular triplets.

    Works on the short side (a tall matrix is transposed), and orthonormalises only there (with
    CholeskyQR2, see _orth): on this CPU a Householder QR of a 10240 x 80 matrix costs ten times
    the (1280 x 10240) product. A power iteration is Q <- orth(A (A^T Q)); A A^T squares the
    spectrum once per step, which float32 carries for the decaying spectra extraction sees (the
    step's Q is exactly orthonormal again).

    Stopping: Z = A^T Q is both the first half of the next step and B^T, the projection the
    answer is read from, so after every step the rank-k error of the current Q is known for the
    price of an l x l eigenvalue problem: err^2 = ||A||_F^2 - (top k eigenvalues of Z^T Z).
    It falls geometrically towards the optimum; the iteration stops once a step lowers it by
    at most `tol` (relative, every matrix of the batch), after at most `power` steps (`tol`
    None: always `power`). With a per-step ratio rho <= 1/2 what is left is at most the last
    decrease, so tol = 1% keeps the error within ~0.5% of optimal (tests/ops/test_svd_randomized.py checks the
    1% contract against the exact SVD on spectra without a gap at k). Easy spectra stop after 1-2
    steps, fine-tune-like ones after about 3; the final Z doubles as B, so no extra product.
    B (l x q) is decomposed through its l x l Gram matrix in float64 (an eigh instead of an
    SVD): S and the left vectors are accurate to float64 round-off relative to sigma_1^2, and
    right vectors of numerically zero singular values are set to zero (they carry no part of A).
    `energy`: ||W_i||_F^2 per matrix if the caller has it (float64), else computed."""
    b, m, n = Wb.shape
    tall = m > n
    A = Wb.mT if tall else Wb  # (b, p, q) with p <= q
    p_, q_ = A.shape[1], A.shape[2]
    ell = min(k + (oversampling(k) if over is None else over), p_)
    g = torch.Generator(device=A.device).manual_seed(seed + 7919 * p_ + 104729 * q_ + 31 * k)
    omega = torch.randn((b, q_, ell), generator=g, device=A.device, dtype=torch.float32).to(A.dtype)
    Q = _orth(A @ omega)  # (b, p, l): range of A
    del omega
    if energy is None:
        energy = _energies(A)
    energy = energy.to(device=A.device, dtype=torch.float64)
    last = None
    for step in range(power + 1):
        Z = A.mT @ Q  # (b, q, l) = B^T for the current Q
        if step == power:
            break
        if tol is not None:
            Zd = Z.double()
            top = torch.linalg.eigvalsh(Zd.mT @ Zd)[..., -k:].clamp_min(0).sum(-1)
            err2 = (energy - top).clamp_min(0)
            if last is not None and bool((last - err2 <= tol * err2 + _NOISE * energy).all()):
                break
            last = err2
        Q = _orth(A @ Z)
    B = Z.mT.double()  # (b, l, q)
    del Z
    evals, evecs = torch.linalg.eigh(B @ B.mT)
    evals, Ub = evals.flip(-1), evecs.flip(-1)
    S = evals.clamp_min(0).sqrt()
    tiny = S[..., :1] * (ell * torch.finfo(torch.float64).eps ** 0.5)
    inv = torch.where(S > tiny, 1.0 / S.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(S))
    V = ((B.mT @ Ub) * inv[..., None, :]).to(A.dtype)  # (b, q, l)
    del B
    U = Q @ Ub.to(A.dtype)  # (b, p, l)
    S = S.to(A.dtype)
    return (V, S, U) if tall else (U, S, V)


def _energies(A: torch.Tensor) -> torch.Tensor:
    """||A_i||_F^2 per matrix of a batch: row norms in A's dtype, their squares summed in float64
    (a float64 copy of the batch would cost as much as the range finder): relative error ~1e-7."""
    return (torch.linalg.vector_norm(A, dim=-1).double() ** 2).sum(-1)


@truncated_svd.register(NAME, priority=20, check=check)
def _svd_randomized(W: torch.Tensor, k: KSpec | Sequence[KSpec] = None,
                    dtype: torch.dtype | None = None) -> Basis | list[Basis]:
    """Randomized range finder (oversampling, power iterations until the error settles), float32 unless told; one
    batched product per step over a batch of same-shape matrices. k must be an int per matrix."""
    Wb, ks, batched = as_batch(W, k)
    if any(not isinstance(x, int) or isinstance(x, bool) for x in ks):
        raise ValueError("the randomized truncated SVD needs an integer k per matrix")
    A = Wb.to(dtype or torch.float32)
    kmax = max(ks)
    energy = _energies(A)
    U, S, V = randomized_svd(A, kmax, energy=energy)
    energies = energy.tolist()
    out = []
    for i, ki in enumerate(ks):
        kk = max(0, min(ki, S.shape[-1]))
        out.append(Basis(U[i, :, :kk], S[i], V[i, :, :kk], float(energies[i])))
    return out if batched else out[0]
