"""Fast op backends against the float64 reference, under the accuracy contract of docs/performance.md:
basis phi >= 0.999 vs the exact float64 subspace on spectra like trained weights."""
import pytest
import torch

from prolora.method import KMode
from prolora.ops import phi, project_group, project_lora, truncated_svd
from prolora.synthetic import generator, spectral_weight

ref = truncated_svd.reference.fn
gram = truncated_svd.backends["gram"].fn


def realistic(shape, seed=0, dtype=torch.float16):
    return spectral_weight(shape, generator("ops", seed, str(shape))).to(dtype)


@pytest.mark.parametrize("shape", [(96, 96), (64, 160), (160, 64), (128, 200)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gram_basis_meets_the_contract(shape, dtype):
    W = realistic(shape, 1, dtype)
    d = min(shape)
    mode = KMode.parse("energy:0.9")
    exact = ref(W, lambda S, e: mode.choose(d, S, e))
    fast = gram(W, exact.k)
    assert fast.U.dtype == torch.float32  # fp32 accumulation from half-precision weights
    assert 0.4 * d <= exact.k <= 0.65 * d  # a realistic spectrum: 90% energy in 40-60% of d
    assert phi(exact.U, fast.U.double()) >= 0.999 and phi(exact.V, fast.V.double()) >= 0.999
    assert torch.allclose(fast.S.double(), exact.S, rtol=1e-3, atol=1e-3 * float(exact.S[0]))
    assert fast.energy == pytest.approx(exact.energy, rel=1e-5)
    # the k chooser sees the spectrum: same k as the reference
    assert gram(W, lambda S, e: mode.choose(d, S, e)).k == exact.k


def test_gram_near_degenerate_boundary():
    """sigma_k and sigma_{k+1} 1e-4 apart: the subspace is still within the contract."""
    m, n, k = 120, 90, 40
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.linspace(3.0, 1.0, n, dtype=torch.float64)
    s[k] = s[k - 1] * (1 - 1e-4)
    W = ((U * s) @ V.T).float()
    exact, fast = ref(W, k), gram(W, k)
    assert exact.gap() < 1.001
    assert phi(exact.U, fast.U.double()) >= 0.999 and phi(exact.V, fast.V.double()) >= 0.999


def test_batched_cuda_branch_equals_single():
    """On CUDA the gram backend solves a batch in one batched GEMM and eigensolver call (the CPU
    solves each matrix alone). That branch runs here on fake CUDA tensors (prolora.fake_cuda):
    every matrix of the batch must meet the contract against its own float64 basis."""
    from prolora.fake_cuda import FakeCuda

    Ws = torch.stack([realistic((48, 80), s) for s in range(3)])
    ks = [10, 20, None]
    with FakeCuda() as fc:
        batch = gram(Ws.to("cuda"), ks)
        assert all(b.U.is_cuda and b.V.is_cuda for b in batch)
        batch = [b.map(lambda t: t.cpu()) for b in batch]
    assert fc.ledger.host_compute == []  # the GEMM and eigh ran on the (fake) device
    for W, k, b in zip(Ws, ks, batch):
        exact = ref(W, k)
        assert b.k == exact.k
        assert phi(exact.U, b.U.double()) >= 0.999 and phi(exact.V, b.V.double()) >= 0.999
        assert torch.allclose(b.S[:b.k].double(), exact.S[:b.k], rtol=1e-3)
    assert [b.k for b in ref(Ws, ks)] == [10, 20, 48]


@pytest.mark.parametrize("method", ["prolora", "prolora-full", "subspace"])
def test_grouped_projection_is_batch_invariant(method):
    """project_group stacks the LoRAs of a module: each result has the bits it has alone (the
    single-LoRA torch backend), whatever its batch mates, their number and its position, and
    matches the float64 reference."""
    g = torch.Generator().manual_seed(5)
    m, n, k = 96, 72, 40
    Us, Ut = (torch.linalg.qr(torch.randn(m, k, generator=g))[0] for _ in range(2))
    Vs, Vt = (torch.linalg.qr(torch.randn(n, k, generator=g))[0] for _ in range(2))
    cross = (Ut.T @ Us, Vt.T @ Vs)
    loras = [(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)) for r in (8, 4, 8, 8, 8, 16, 8, 4, 8)]
    alone = [project_lora.backends["torch"].fn(B, A, Us, Vs, Ut, Vt, method, cross=cross) for B, A in loras]
    for batch in (loras, loras[::-1], loras[2:7], loras[:1]):
        got = project_group(batch, Us, Vs, Ut, Vt, method, cross=cross)
        for (B, A), (up, down) in zip(batch, got):
            i = next(j for j, x in enumerate(loras) if x[0] is B)
            assert torch.equal(up, alone[i][0]) and torch.equal(down, alone[i][1])
    for (B, A), (up, down) in zip(loras, alone):
        u0, d0 = project_lora.reference.fn(B, A, Us, Vs, Ut, Vt, method)
        exact = u0 @ d0
        assert float((up.double() @ down.double() - exact).norm() / exact.norm()) < 1e-5


def test_fast_projection_matches_reference():
    g = torch.Generator().manual_seed(3)
    m, n, r, k = 70, 50, 4, 20
    Us, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    Ut, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    Vs, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    Vt, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    B, A = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    fast = project_lora.backends["torch"].fn
    for method in ("prolora", "prolora-full", "subspace"):
        u0, d0 = project_lora.reference.fn(B, A, Us, Vs, Ut, Vt, method)
        u1, d1 = fast(B, A, Us, Vs, Ut, Vt, method)
        assert u1.dtype == torch.float32
        exact = u0 @ d0
        assert float((u1.double() @ d1.double() - exact).norm() / exact.norm()) < 1e-5
        # with the cross products the similarity gate formed (Ut^T Us, Vt^T Vs): same result
        cross = (Ut.double().T @ Us.double(), Vt.double().T @ Vs.double())
        for fn, tol in ((project_lora.reference.fn, 1e-12), (fast, 1e-5)):
            u2, d2 = fn(B, A, Us, Vs, Ut, Vt, method, cross=cross)
            assert float((u2.double() @ d2.double() - exact).norm() / exact.norm()) < tol, (method, fn)
            if method != "prolora-full":  # the parts themselves, not only their product
                u3, d3 = fn(B, A, Us, Vs, Ut, Vt, method)
                assert torch.allclose(u2.double(), u3.double(), atol=tol * 10) and \
                    torch.allclose(d2.double(), d3.double(), atol=tol * 10)
