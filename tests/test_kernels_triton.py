"""Triton kernels (prolora.kernels) and their op backends against the float64 references.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py, before anything can
import Triton) on CPU
tensors in float32 with small shapes; with one, the same tests run compiled on CUDA tensors.
Errors are judged against plain torch in the same precision (FlashAttention's habit): our error
vs float64 must be at most RATIO times torch's float32 error (floored at float32 eps).
"""
from __future__ import annotations

import os

import torch

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from prolora.kernels import lowrank, tn as tnk  # noqa: E402
from prolora.kernels._config import NO_GPU  # noqa: E402
from prolora.kernels.projection import project, project_batched  # noqa: E402
from prolora.method import KMode  # noqa: E402
from prolora.ops import (Problem, phi, principal_cosines, project_lora, subspace_phi,  # noqa: E402
                         truncated_svd)
from prolora.ops import backends_triton  # noqa: E402
from prolora.synthetic import generator, spectral_weight  # noqa: E402

pytestmark = pytest.mark.interpreter

DEV = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = 2.0
EPS32 = torch.finfo(torch.float32).eps


def rel(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float((x.double() - exact).norm() / exact.norm())


def within(ours: float, torch_err: float) -> bool:
    return ours <= RATIO * max(torch_err, EPS32)


def orth(g: torch.Generator, m: int, k: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


# ---- the batched A^T X product and the Gram kernel -----------------------------------------


@pytest.mark.parametrize("b,L,P,Q", [(3, 50, 37, 21), (1, 1, 5, 1), (2, 33, 16, 40)])
def test_tn_matches_float64_and_torch(b, L, P, Q):
    g = torch.Generator().manual_seed(b * 100 + L)
    a = torch.randn(b, L, P, generator=g, dtype=torch.float64)
    x = torch.randn(b, L, Q, generator=g, dtype=torch.float64)
    exact = a.mT @ x
    c, sq = tnk.tn(a.float().to(DEV), x.float().to(DEV), squares=True)
    assert c.dtype == torch.float32 and c.shape == (b, P, Q)
    assert within(rel(c.cpu(), exact), rel(a.float().mT @ x.float(), exact))
    assert torch.allclose(sq.cpu(), (exact ** 2).sum((1, 2)), rtol=1e-5)


def test_tn_takes_any_strides_and_single_matrices():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 30, generator=g)
    a = base.T.to(DEV)          # (30, 40), column-major
    x = torch.randn(64, 30, generator=g)[::2].T.to(DEV)  # (30, 32), strided rows
    c, sq = tnk.tn(a, x)
    assert sq is None and c.shape == (40, 32)
    exact = a.double().T @ x.double()
    assert rel(c, exact) < 1e-6


def test_tn_norms_without_storing():
    g = torch.Generator().manual_seed(2)
    a, x = torch.randn(2, 20, 18, generator=g), torch.randn(2, 20, 19, generator=g)
    c, sq = tnk.tn(a.to(DEV), x.to(DEV), store=False, squares=True)
    assert c is None
    exact = ((a.double().mT @ x.double()) ** 2).sum((1, 2))
    assert torch.allclose(sq.cpu(), exact, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 45, 29), (1, 20, 70)])
def test_gram_is_the_symmetric_product(shape):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(*shape, generator=g, dtype=torch.float64)
    exact = a.mT @ a
    G = tnk.gram(a.float().to(DEV)).cpu()
    assert torch.equal(G, G.mT)  # mirrored tiles: exactly symmetric
    assert within(rel(G, exact), rel(a.float().mT @ a.float(), exact))


def test_one_matrix_gives_the_same_bits_alone_or_in_a_batch():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(4, 37, 23, generator=g).to(DEV)
    x = torch.randn(4, 37, 17, generator=g).to(DEV)
    batch_c, _ = tnk.tn(a, x)
    alone_c, _ = tnk.tn(a[2:3], x[2:3])
    assert torch.equal(batch_c[2], alone_c[0])
    assert torch.equal(tnk.gram(a)[1], tnk.gram(a[1])[...])


def test_expand_writes_both_outputs_and_their_sum():
    g = torch.Generator().manual_seed(5)
    b, m, k, r = 2, 35, 20, 3
    u1, u2 = torch.randn(b, m, k, generator=g), torch.randn(b, m, k, generator=g)
    c1, c2, c3 = (torch.randn(b, k, r, generator=g) for _ in range(3))
    x = torch.randn(b, m, r, generator=g)
    oa = torch.empty(b, m, r, device=DEV)
    ob = torch.empty(b, r, m, device=DEV).mT  # a strided output
    args = [t.to(DEV) for t in (u1, c1, u2, c2, c3, x)]
    lowrank.expand(args[0], args[1], out_a=oa, u2=args[2], c2=args[3], c3=args[4], x=args[5], out_b=ob)
    d = [t.double() for t in (u1, c1, u2, c2, c3, x)]
    ea = d[0] @ d[1]
    eb = d[5] + d[2] @ d[3] + d[0] @ d[4]
    assert rel(oa.cpu(), ea) < 1e-6 and rel(ob.cpu(), eb) < 1e-6
    s = torch.empty(b, m, r, device=DEV)
    lowrank.expand(args[0], args[1], out_a=s, u2=args[2], c2=args[3], c3=args[4], x=args[5], add=True)
    assert rel(s.cpu(), ea + eb) < 1e-6


# ---- project_lora/triton ---------------------------------------------------------------------


def _layer(seed: int, m: int = 40, n: int = 56, k: int = 12, r: int = 4):
    g = torch.Generator().manual_seed(seed)
    Us, Ut, Vs, Vt = orth(g, m, k), orth(g, m, k), orth(g, n, k), orth(g, n, k)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    return B, A, Us, Vs, Ut, Vt


@pytest.mark.parametrize("method", ["prolora", "prolora-full", "subspace"])
@pytest.mark.parametrize("dims", [(40, 56, 12, 4), (70, 33, 20, 6), (24, 24, 0, 2)])
def test_projection_meets_the_contract(method, dims):
    args = _layer(7, *dims)
    up0, down0 = project_lora.reference.fn(*args, method)
    exact = up0 @ down0
    f32 = [t.float() for t in args]
    up_t, down_t = project_lora.backends["torch"].fn(*f32, method)
    up, down = project_lora.backends["triton"].fn(*(t.to(DEV) for t in f32), method)
    assert up.dtype == down.dtype == torch.float32
    assert up.shape == up0.shape and down.shape == down0.shape
    # each factor, not only the product: the output layout is the reference's
    for ours, theirs, ref in ((up, up_t, up0), (down, down_t, down0)):
        if ref.norm() > 0:
            assert within(rel(ours.cpu(), ref), rel(theirs, ref))
    if exact.norm() > 0:
        assert within(rel(up.cpu().double() @ down.cpu().double(), exact),
                      rel(up_t.double() @ down_t.double(), exact))


def test_projection_k0_keeps_everything_in_the_complement():
    B, A, Us, Vs, Ut, Vt = (t.float() for t in _layer(8, k=0))
    up, down = project(*(t.to(DEV) for t in (B, A, Us, Vs, Ut, Vt)), "prolora")
    r = B.shape[1]
    assert torch.equal(up[:, :r].cpu(), torch.zeros_like(B)) and torch.allclose(up[:, r:].cpu(), B)
    assert torch.allclose(down[r:].cpu(), A)


def test_projection_copy_is_identity_and_unknown_method_fails():
    B, A, *rest = (t.float() for t in _layer(9))
    up, down = project_lora.backends["triton"].fn(B, A, *rest, "copy")
    assert up is B and down is A
    with pytest.raises(ValueError, match="unknown method"):
        project(B, A, *rest, "nope")


def test_projection_batched_equals_per_layer_and_takes_strided_inputs():
    layers = [[t.float() for t in _layer(s)] for s in (10, 11, 12)]
    stacked = [torch.stack([lay[i] for lay in layers]).to(DEV) for i in range(6)]
    # A as a transposed view of a (b, n, r) buffer: the kernel reads strides, copies nothing
    stacked[1] = stacked[1].mT.contiguous().mT
    up, down = project_batched(*stacked, "prolora")
    for i, lay in enumerate(layers):
        u1, d1 = project(*(t.to(DEV) for t in lay), "prolora")
        assert torch.equal(up[i], u1) and torch.equal(down[i], d1)


def test_projection_rejects_other_dtypes_and_mismatched_shapes():
    args = [t.float() for t in _layer(13)]
    with pytest.raises(ValueError, match="float32"):
        project_lora.backends["triton"].fn(*args, "prolora", dtype=torch.float64)
    bad = [t[None] for t in args]
    bad[2] = bad[2][:, :-1]
    with pytest.raises(ValueError, match="do not match"):
        project_batched(*bad, "prolora")


# ---- truncated_svd/gram-triton(-jacobi) --------------------------------------------------------


def realistic(shape, seed=0):
    return spectral_weight(shape, generator("kernels", seed, str(shape)))


@pytest.mark.parametrize("backend", ["gram-triton", "gram-triton-jacobi"])
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_gram_triton_basis_meets_the_contract(backend, shape):
    if backend.endswith("jacobi"):
        from prolora import _native
        if not _native.available():
            pytest.skip(str(_native.why_unavailable()))
    W = realistic(shape, 1)
    d = min(shape)
    mode = KMode.parse("energy:0.9")
    chooser = lambda S, e: mode.choose(d, S, e)  # noqa: E731
    exact = truncated_svd.reference.fn(W, chooser)
    base = truncated_svd.backends["gram"].fn(W, exact.k)
    fast = truncated_svd.backends[backend].fn(W.to(DEV), chooser)
    assert fast.k == exact.k and fast.U.dtype == torch.float32
    assert fast.U.shape == (shape[0], exact.k) and fast.V.shape == (shape[1], exact.k)
    for side in ("U", "V"):
        ours = phi(getattr(exact, side), getattr(fast, side).cpu().double())
        theirs = phi(getattr(exact, side), getattr(base, side).double())
        assert ours >= 0.999 and 1 - ours <= RATIO * max(1 - theirs, EPS32)
    assert within(rel(fast.S.cpu(), exact.S), rel(base.S, exact.S))
    assert fast.energy == pytest.approx(exact.energy, rel=1e-5)


def test_gram_triton_batched_equals_single():
    Ws = torch.stack([realistic((40, 64), s) for s in range(3)]).to(DEV)
    ks = [5, 12, None]
    fn = truncated_svd.backends["gram-triton"].fn
    batch = fn(Ws, ks)
    assert [b.k for b in batch] == [5, 12, 40]
    for W, k, b in zip(Ws, ks, batch):
        one = fn(W, k)
        assert torch.equal(b.U, one.U) and torch.equal(b.V, one.V) and torch.equal(b.S, one.S)


# ---- similarity --------------------------------------------------------------------------------


def test_subspace_phi_and_cosines_match_the_reference():
    g = torch.Generator().manual_seed(14)
    A = torch.stack([orth(g, 50, 10) for _ in range(3)])
    B = torch.stack([orth(g, 50, 14) for _ in range(3)])
    B[1, :, :5] = A[1, :, :5]  # a partly shared subspace
    ref = subspace_phi.reference.fn(A, B)
    torch_phi = subspace_phi.backends["torch"].fn(A.float(), B.float())
    ours = subspace_phi.backends["triton"].fn(A.float().to(DEV), B.float().to(DEV)).cpu()
    assert ours.dtype == torch.float64 and ours.shape == (3,)
    assert within(rel(ours, ref), rel(torch_phi, ref))
    assert float(ours[1]) > float(ours[0]) + 0.2
    assert float(subspace_phi.backends["triton"].fn(A[0].float().to(DEV), A[0].float().to(DEV))) == \
        pytest.approx(1.0, abs=1e-5)
    cos_ref = principal_cosines.reference.fn(A[1], B[1])
    cos = principal_cosines.backends["triton"].fn(A[1].float().to(DEV), B[1].float().to(DEV)).cpu()
    assert torch.allclose(cos.double(), cos_ref, atol=1e-5)
    assert torch.allclose(cos[:5].double(), torch.ones(5, dtype=torch.float64), atol=1e-5)


# ---- dispatch ----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_a_gpu_triton_is_never_chosen_and_says_why():
    assert backends_triton.triton_missing() == NO_GPU
    for op in (project_lora, truncated_svd, subspace_phi, principal_cosines):
        for name, b in op.backends.items():
            if "triton" in name:
                assert b.available() == NO_GPU
        choice = op.choose(Problem(device="cpu", dtype="float32", shape=(64, 64)))
        assert "triton" not in choice.backend.name
        assert all(choice.rejected[n] == NO_GPU for n in op.backends if "triton" in n)


# ---- on a GPU: half precision and real sizes (benchmarks/gpu_check.sh runs these) ---------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_half_precision_inputs(dtype):
    args = [t.to(dtype) for t in _layer(20, m=1280, n=1280, k=640, r=16)]
    exact_args = [t.double() for t in args]  # the quantized inputs, exactly
    up0, down0 = project_lora.reference.fn(*exact_args, "prolora")
    up_t, down_t = project_lora.backends["torch"].fn(*(t.cuda() for t in args), "prolora")
    up, down = project_lora.backends["triton"].fn(*(t.cuda() for t in args), "prolora")
    assert within(rel(up.cpu(), up0), rel(up_t.cpu(), up0))
    assert within(rel(down.cpu(), down0), rel(down_t.cpu(), down0))
    W = realistic((640, 1280), 3).to(dtype)
    exact = truncated_svd.reference.fn(W, 256)
    for name in ("gram-triton", "gram-triton-jacobi"):
        fast = truncated_svd.backends[name].fn(W.cuda(), 256)
        assert phi(exact.U, fast.U.cpu().double()) >= 0.999 and phi(exact.V, fast.V.cpu().double()) >= 0.999
    a = torch.randn(8, 1280, 320, device="cuda").to(dtype)
    x = torch.randn(8, 1280, 48, device="cuda").to(dtype)
    a0, x0 = a.clone(), x.clone()
    c, _ = tnk.tn(a, x)  # first call of this key: the autotuner runs every config
    assert torch.equal(a, a0) and torch.equal(x, x0)  # inputs untouched (reset_to_zero, scratch)
    exactC = a.double().mT @ x.double()
    assert within(rel(c.cpu(), exactC.cpu()), rel((a.float().mT @ x.float()).cpu(), exactC.cpu()))
    G = tnk.gram(a)
    exactG = a.double().mT @ a.double()
    assert within(rel(G.cpu(), exactG.cpu()), rel((a.float().mT @ a.float()).cpu(), exactG.cpu()))


# ---- the real compiler, without a GPU ----------------------------------------------------------

AOT_SAMPLE = ["tn[fp16,upcast=False,store=True,sq=False]", "tn[fp32,upcast=True,store=False,sq=True]",
              "gram[bf16]", "expand[fp16,HAS_U2,HAS_X,WRITE_A,WRITE_B]", "expand[fp32,HAS_U2,HAS_X,WRITE_A,WRITE_B,SUM]"]


def test_kernels_compile_for_hopper_without_a_gpu():
    """Lowers a sample of the kernel variants to sm_90 cubin through Triton's real pipeline and
    ptxas (the interpreter checks the math, not that the kernels compile). In a subprocess: this
    process may be interpreting."""
    import subprocess
    import sys

    from prolora.kernels.aot import variants

    labels = {v[0] for v in variants()}
    assert set(AOT_SAMPLE) <= labels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = ("from prolora.kernels.aot import compile_all; import sys; "
            f"done = compile_all(90, set({AOT_SAMPLE!r})); "
            "print(done); sys.exit(0 if len(done) == %d and all(n > 0 for _, n in done) else 1)" % len(AOT_SAMPLE))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
