"""Seeded generators and weights with trained-like spectra.

A spectral weight is U diag(s) V^T with random orthonormal (Haar) factors and singular values
shaped like trained ones: sigma_1/sigma_{d/4} in 2.8-3.2 and 90% of the sigma^2 energy in 43-59%
of the directions (convs on their (out, in*kh*kw) view), so that the energy-based k and the
subspace similarities the method computes meet a trained-like decay rather than the flat
spectrum of a Gaussian matrix.
"""
from __future__ import annotations

import hashlib
import math

import torch


def generator(*parts: object, device: str | torch.device | None = None) -> torch.Generator:
    """A torch generator (on the CPU unless `device` is given) seeded by the parts' names alone
    (sha256 of their str, NUL-joined). Draws on a GPU generator give other values than the
    CPU's: a model generated on a GPU is another model of the same shapes (used to build
    full-size pairs in seconds where a GPU is at hand).

    Every synthetic tensor draws from its own generator named after what it is (e.g. `("source",
    seed, component, name)`), so a value does not depend on which other tensors were made before
    it, in which order or in which process; tests and benchmarks use it for reproducible inputs.
    """
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return torch.Generator(device=device or "cpu").manual_seed(int.from_bytes(digest[:8], "little"))


def spectrum(d: int, g: torch.Generator) -> torch.Tensor:
    """d singular values, decreasing, shaped like trained weights (see the module doc).

    s(x) = (1 + x/c)^-p (1 - 0.97x)^q at x = (i + 1/2)/d, with c, q drawn per weight and p solved
    (in closed form) so that s_0 / s_{d/4} equals a ratio drawn from [2.8, 3.2].
    """
    u = torch.rand(3, generator=g, dtype=torch.float64, device=g.device).tolist()
    ratio, c, q = 2.8 + 0.4 * u[0], 0.04 + 0.02 * u[1], 0.2 + 0.2 * u[2]
    x = (torch.arange(d, dtype=torch.float64) + 0.5) / d
    x0, xq = x[0].item(), x[d // 4].item()
    tail = ((1 - 0.97 * xq) / (1 - 0.97 * x0)) ** q
    p = max(0.0, math.log(ratio * tail) / math.log((1 + xq / c) / (1 + x0 / c))) if d >= 4 else 0.0
    return (1 + x / c) ** (-p) * (1 - 0.97 * x) ** q


def _orthonormal(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """n x d with orthonormal columns, Haar-distributed: the Q of a Gaussian's QR (R > 0 diagonal).

    Computed as Cholesky-QR (Q = G R^-1, R = chol(G^T G)), several times faster than Householder
    on CPU; in float64 when G is near-square (ill-conditioned), float32 when n >= 2d (cond <= 6).
    """
    gauss = torch.randn(n, d, generator=g, device=g.device)
    work = gauss if n >= 2 * d else gauss.double()
    try:
        r = torch.linalg.cholesky(work.T @ work, upper=True)
        return torch.linalg.solve_triangular(r, work, upper=True, left=False).float()
    except RuntimeError:  # numerically singular Gram matrix: fall back to Householder
        q, r = torch.linalg.qr(gauss.double())
        return (q * torch.sign(torch.diagonal(r))).float()


def spectral_weight(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A float32 weight U diag(s) V^T with `spectrum` values and entries of RMS 1/sqrt(fan_in)."""
    m, n = shape[0], math.prod(shape[1:])
    d = min(m, n)
    s = spectrum(d, g)
    s = (s * math.sqrt(m) / s.norm()).float().to(g.device)
    w = (_orthonormal(m, d, g) * s) @ _orthonormal(n, d, g).T
    return w.reshape(shape)
