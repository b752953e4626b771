"""The randomized truncated SVD (ops/svd_randomized.py, the `randomized` backend of truncated_svd that
`prolora extract` uses), checked against the float64 exact SVD: the Frobenius error of the rank-k
approximation within 1% of the optimal one on spectra without a gap at k; the top-k subspace
phi >= 0.999 where the spectrum has a gap at k; batches and rank-deficient inputs; refused by
dispatch for problems without a small integer k (so a transfer keeps its backends)."""
from __future__ import annotations

import pytest
import torch

from prolora.ops import phi, truncated_svd
from prolora.ops.registry import Problem
from prolora.ops.svd_randomized import check as randomized_check

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _matrix(m: int, n: int, S: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = S.numel()
    U = torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64)).Q
    return (U * S) @ V.T


SPECTRA = {  # none has a gap at k: the hard case for a range finder that stops early
    "knee": lambda i: 1.0 / (1.0 + i / 8) + 0.03,  # the extract bench's fine-tune-like spectrum
    "power-law": lambda i: (1.0 + i) ** -0.5,  # slow decay
    "slow-knee": lambda i: 1.0 / (1.0 + i / 64) + 0.01,
}


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("m,n", [(384, 640), (640, 384)])
def test_randomized_svd_frobenius_error_within_one_percent_of_optimal(m, n, spectrum):
    k = 24
    d = min(m, n)
    S = SPECTRA[spectrum](torch.arange(d, dtype=torch.float64))
    W = _matrix(m, n, S, seed=1).float()
    rb = truncated_svd.backends["randomized"].fn(W, k)
    ref = truncated_svd.reference.fn(W, k)
    approx = (rb.U.double() * rb.S[:k].double()) @ rb.V.double().T
    opt = float((ref.S[k:].double() ** 2).sum().sqrt())
    ratio = float((W.double() - approx).norm()) / opt
    assert 1.0 - 1e-6 <= ratio <= 1.01, ratio
    assert abs(rb.energy - ref.energy) <= 1e-6 * ref.energy
    # U, V orthonormal
    assert float((rb.U.double().T @ rb.U.double() - torch.eye(k, dtype=torch.float64)).abs().max()) < 1e-4


def test_randomized_svd_subspace_where_the_gap_allows():
    k, m, n = 16, 512, 768
    S = torch.cat([2.0 + torch.linspace(1.0, 0.0, k, dtype=torch.float64),
                   1.0 / (1.0 + torch.arange(m - k, dtype=torch.float64) / 8)])  # gap 2 at k
    W = _matrix(m, n, S, seed=2).float()
    rb = truncated_svd.backends["randomized"].fn(W, k)
    ref = truncated_svd.reference.fn(W, k)
    assert phi(rb.U.double(), ref.U) >= 0.999
    assert phi(rb.V.double(), ref.V) >= 0.999
    assert float((rb.S[:k].double() - ref.S[:k]).abs().max() / ref.S[0]) < 1e-5


def test_randomized_svd_batch_and_rank_deficient_input():
    g = torch.Generator().manual_seed(3)
    low = torch.randn(300, 5, generator=g) @ torch.randn(5, 400, generator=g)  # rank 5, k 20
    W = torch.stack([low, 2 * low])
    out = truncated_svd.backends["randomized"].fn(W, [20, 20])
    for b, Wi in zip(out, W):
        approx = (b.U.double() * b.S[:20].double()) @ b.V.double().T
        assert torch.isfinite(approx).all()
        assert rel(approx, Wi.double()) < 1e-5


def test_randomized_dispatch_needs_a_small_integer_k():
    # a transfer's problem (energy-chosen k: none given) never gets it
    assert randomized_check(Problem(device="cpu", dtype="float32")) is not None
    assert truncated_svd.choose(Problem(device="cpu", dtype="float32")).backend.name != "randomized"
    assert "not small" in randomized_check(Problem(shape=(640, 640), k=320))
    assert randomized_check(Problem(shape=(64, 64), k=4)) is not None  # too small to bother
    assert truncated_svd.choose(Problem(shape=(1280, 5120), k=64)).backend.name == "randomized"
