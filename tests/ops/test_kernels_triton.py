"""Triton kernels (prolora.kernels) and their op backends against the float64 references.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py, before anything can
import Triton) on CPU tensors with small shapes; with one, the same tests run compiled on CUDA
tensors. What a GPU runs is covered here: float16/bfloat16/float32 inputs with float32
accumulation, every autotune configuration's tile sizes (forced with interp_config under the
interpreter), ranks 1..256 (rank tiles of 16/32/64 columns, partial last tiles).

Errors are judged against plain torch (FlashAttention's habit): our relative error vs float64
on the same (quantized) inputs must be at most RATIO times torch's error when it computes in
float32, the precision the kernels accumulate in (floored at float32 eps). A kernel that
accumulated in half precision, or lost a tile, would be off by orders of magnitude.

bfloat16 under the interpreter: Triton's emulated bfloat16 tl.dot is wrong (docs/performance.md,
"Triton's interpreter and bfloat16"), so bfloat16 pairs are upcast there (exactly what the tensor cores compute:
bfloat16 products are exact in float32); the bfloat16 loads, masks and stores run as on a GPU,
the bfloat16 tensor-core dot is compiled by tests/ops/test_kernels_aot.py and run by the GPU tests.
"""
from __future__ import annotations

import contextlib

import torch

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from prolora.kernels import _config, lowrank, tn as tnk  # noqa: E402
from prolora.kernels._config import NO_GPU, interp_config, interpreting  # noqa: E402
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
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RANKS = [1, 3, 16, 17, 64, 128, 256]


def rel(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float((x.cpu().double() - exact.cpu()).norm() / exact.cpu().norm())


def within(ours: float, torch_err: float) -> bool:
    return ours <= RATIO * max(torch_err, EPS32)


def check(ours: torch.Tensor, exact: torch.Tensor, torch32: torch.Tensor, what: str = "") -> None:
    """ours vs float64 within RATIO of torch's float32 error on the same inputs, with both
    errors in the message."""
    e, t = rel(ours, exact), rel(torch32, exact)
    assert within(e, t), f"{what}: relative error {e:.3g} vs torch float32's {t:.3g}"


def orth(g: torch.Generator, m: int, k: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


def cfg_id(config: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in config.items()).replace("num_warps", "w").replace("num_stages", "s")


@contextlib.contextmanager
def tiles(**per_kernel: dict):
    """Runs the block with these configurations' tile sizes under the interpreter (on a GPU the
    autotuner chooses among all of them, so the block runs as is)."""
    with contextlib.ExitStack() as stack:
        if interpreting():
            for kernel, config in per_kernel.items():
                stack.enter_context(interp_config(kernel, config))
        yield


class LaunchSpy:
    """Stands in for a kernel: records each launch's grid (evaluated with the launch's meta)
    and runs the real kernel unless run=False."""

    def __init__(self, real, run: bool = True):
        self.real, self.run, self.grids, self.metas = real, run, [], []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            meta = {k: v for k, v in kw.items() if k[0] == "B"}  # the tile sizes
            self.metas.append(meta)
            self.grids.append(grid(meta) if meta else None)
            if self.run:
                return self.real[grid](*args, **kw)
        return launch


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


# ---- every tile configuration, dtype and rank, against float64 ------------------------------

TN_MMA_PAIRS = [("fp16", "fp16"), ("bf16", "bf16")]  # tensor-core dots on a GPU
TN_FMA_PAIRS = [("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp32", "bf16")]  # upcast
TN_CASES = [(c, *pair) for c in tnk._TN_MMA for pair in TN_MMA_PAIRS] + \
    [(c, *pair) for c in tnk._TN_FMA for pair in TN_FMA_PAIRS]


@pytest.mark.parametrize("config,da,dx", TN_CASES, ids=lambda v: cfg_id(v) if isinstance(v, dict) else v)
def test_tn_under_every_configuration_and_dtype(config, da, dx):
    """C = A^T X and its squared norms with each autotune configuration's tiles, for the operand
    pairs a GPU launch runs it with (tensor-core configurations for half pairs, FMA ones for
    upcast pairs); P, Q span several tiles of the small ones and end in partial tiles."""
    g = torch.Generator().manual_seed(21)
    a = torch.randn(2, 70, 150, generator=g).to(DTYPES[da])
    x = torch.randn(2, 70, 40, generator=g).to(DTYPES[dx])
    exact = a.double().mT @ x.double()
    torch32 = a.float().mT @ x.float()
    with tiles(tn=config):
        c, sq = tnk.tn(a.to(DEV), x.to(DEV), squares=True)
    assert c.dtype == torch.float32 and c.shape == exact.shape
    check(c, exact, torch32, f"tn {da}x{dx}")
    check(sq, (exact ** 2).sum((1, 2)), (torch32.double() ** 2).sum((1, 2)), "squared norms")


GRAM_CASES = [(c, d) for c in tnk._GRAM_MMA for d in ("fp16", "bf16")] + [(c, "fp32") for c in tnk._GRAM_FMA]


@pytest.mark.parametrize("config,dtype", GRAM_CASES, ids=lambda v: cfg_id(v) if isinstance(v, dict) else v)
def test_gram_under_every_configuration_and_dtype(config, dtype):
    """A^T A over three triangle tiles of the 64-wide configurations (more of the interpreter's),
    exactly symmetric, within the float32 bound."""
    g = torch.Generator().manual_seed(22)
    a = torch.randn(2, 50, 100, generator=g).to(DTYPES[dtype])
    exact = a.double().mT @ a.double()
    with tiles(gram=config):
        G = tnk.gram(a.to(DEV)).cpu()
    assert torch.equal(G, G.mT)
    check(G, exact, a.float().mT @ a.float(), f"gram {dtype}")


def _expand_case(r: int, dtype: torch.dtype, seed: int, b: int = 2, m: int = 40, k: int = 20):
    """Inputs of expand (U, X in `dtype`, coefficients float32) and the exact outputs on them."""
    g = torch.Generator().manual_seed(seed)
    u1, u2 = (torch.randn(b, m, k, generator=g).to(dtype) for _ in range(2))
    c1, c2, c3 = (torch.randn(b, k, r, generator=g) for _ in range(3))
    x = torch.randn(b, m, r, generator=g).to(dtype)
    return u1, u2, x, c1, c2, c3


def _expand_exact(u1, u2, x, c1, c2, c3, dtype=torch.float64):
    u1, u2, x, c1, c2, c3 = (t.to(dtype) for t in (u1, u2, x, c1, c2, c3))
    return u1 @ c1, x + u2 @ c2 + u1 @ c3


EXPAND_RANKS = [3, 17, 256]  # one partial rank tile; a partial second one; 4 to 16 full tiles


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("config", lowrank._CONFIGS, ids=cfg_id)
def test_expand_under_every_configuration_dtype_and_rank(config, dtype):
    """out_a = U1 C1, out_b = X + U2 C2 + U1 C3 (two outputs, one strided), their sum, and U1 C1
    alone (the three flag sets the projection launches), at ranks that end in a partial rank
    tile, cross one, or span 4 to 16 of them (all of 1..256 run through the projection below)."""
    for r in EXPAND_RANKS:
        u1, u2, x, c1, c2, c3 = _expand_case(r, DTYPES[dtype], seed=r)
        ea, eb = _expand_exact(u1, u2, x, c1, c2, c3)
        ta, tb = _expand_exact(u1, u2, x, c1, c2, c3, torch.float32)
        d = [t.to(DEV) for t in (u1, u2, x, c1, c2, c3)]
        oa = torch.empty(ea.shape, device=DEV)
        ob = torch.empty(eb.mT.shape, device=DEV).mT  # a strided output
        s = torch.empty(ea.shape, device=DEV)
        only = torch.empty(ea.shape, device=DEV)
        with tiles(expand=config):
            lowrank.expand(d[0], d[3], out_a=oa, u2=d[1], c2=d[4], c3=d[5], x=d[2], out_b=ob)
            lowrank.expand(d[0], d[3], out_a=s, u2=d[1], c2=d[4], c3=d[5], x=d[2], add=True)
            lowrank.expand(d[0], d[3], out_a=only)
        check(oa, ea, ta, f"U1 C1, r={r}")
        check(ob, eb, tb, f"X + U2 C2 + U1 C3, r={r}")
        check(s, ea + eb, ta + tb, f"sum, r={r}")
        check(only, ea, ta, f"U1 C1 alone, r={r}")


@pytest.mark.skipif(not interpreting(), reason="the spy reads the interpreter's launch meta")
def test_interp_config_sets_the_tiles_the_kernels_launch_with(monkeypatch):
    """The per-configuration tests above are only worth something if the forced tiles are the
    ones launched: the launches' meta and grids say so."""
    spy = LaunchSpy(lowrank._expand_kernel)
    monkeypatch.setattr(lowrank, "_expand_kernel", spy)
    u1, _, _, c1, _, _ = _expand_case(70, torch.float32, seed=1, b=2, m=130, k=8)
    out = torch.empty(2, 130, 70)
    config = lowrank._CONFIGS[-1]
    with tiles(expand=config):
        lowrank.expand(u1, c1, out_a=out)
    lowrank.expand(u1[:, :20], c1, out_a=torch.empty(2, 20, 70))
    forced, default = spy.metas
    assert forced == _config.meta_of(config) and default == {"BM": 16, "BK": 16, "BR": 16}
    # one grid axis: batch x row tiles x rank tiles
    assert spy.grids == [(2 * triton.cdiv(130, config["BM"]) * triton.cdiv(70, config["BR"]),), (2 * 2 * 5,)]
    assert torch.allclose(out, u1 @ c1, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not interpreting(), reason="the spy reads the interpreter's launch meta")
def test_batches_past_axis_1s_limit_fold_into_axis_0(monkeypatch):
    """100,000 matrices: grid axis 1 would stop at 65,535; every kernel puts the batch on axis 0
    (2**31 - 1), and check_grid refuses only past that. The kernels are not run (the spy)."""
    b = 100_000
    spies = {name: LaunchSpy(getattr(mod, name), run=False)
             for mod, name in ((tnk, "_tn_kernel"), (tnk, "_gram_kernel"), (lowrank, "_expand_kernel"))}
    monkeypatch.setattr(tnk, "_tn_kernel", spies["_tn_kernel"])
    monkeypatch.setattr(tnk, "_gram_kernel", spies["_gram_kernel"])
    monkeypatch.setattr(lowrank, "_expand_kernel", spies["_expand_kernel"])
    a = torch.zeros(b, 4, 20)
    tnk.tn(a, torch.zeros(b, 4, 3))
    tnk.gram(a)
    lowrank.expand(a, torch.zeros(b, 20, 40), out_a=torch.empty(b, 4, 40))
    assert spies["_tn_kernel"].grids == [(b * 2 * 1,)]        # P = 20: 2 row tiles of 16
    assert spies["_gram_kernel"].grids == [(b * 3,)]          # D = 20: 2 x 2 tiles, 3 below the diagonal
    assert spies["_expand_kernel"].grids == [(b * 1 * 3,)]    # r = 40: 3 rank tiles of 16
    assert _config.check_grid(2**31 - 1, "x") == 2**31 - 1
    with pytest.raises(ValueError, match="grid axis 0"):
        _config.check_grid(2**31, "x")



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


def _check_projection(got, args64, method: str, what: str) -> None:
    """Both factors of a Triton projection against the float64 reference on the same inputs,
    within RATIO of the torch backend's float32 error."""
    up, down = got
    ref = project_lora.reference.fn(*args64, method)
    theirs = project_lora.backends["torch"].fn(*(t.float() for t in args64), method)
    assert up.dtype == down.dtype == torch.float32
    for ours, t, r, side in ((up, theirs[0], ref[0], "up"), (down, theirs[1], ref[1], "down")):
        assert ours.shape == r.shape, f"{what} {side}: shape {tuple(ours.shape)} vs {tuple(r.shape)}"
        check(ours, r, t, f"{what} {side}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("r", RANKS)
def test_projection_every_rank_and_dtype(r, dtype):
    """Ranks 1..256 from float16/bfloat16/float32 factors and bases, on a conv LoRA's shapes: the
    down factor r x (c kh kw) = r x (4 * 3 * 3) flattened, as the engine passes it. At r = 17
    every method (the expand kernel's three flag sets)."""
    args64 = [t.to(DTYPES[dtype]).double() for t in _layer(30 + r, m=40, n=4 * 3 * 3, k=12, r=r)]
    for method in (("prolora", "prolora-full", "subspace") if r == 17 else ("prolora",)):
        # 64-wide tiles: the interpreter's 16-wide default would run 16x the programs at
        # r = 256; the narrow rank tiles run in the expand and per-configuration tests
        with tiles(tn=tnk._TN_CONFIGS[0], expand=lowrank._CONFIGS[4]):
            got = project(*(t.to(DTYPES[dtype]).to(DEV) for t in args64), method)
        _check_projection(got, args64, method, f"{method} r={r} {dtype}")


@pytest.mark.parametrize("i", range(max(len(tnk._TN_CONFIGS), len(lowrank._CONFIGS))))
def test_projection_under_every_tile_configuration(i):
    """The whole projection with the i-th configuration of each kernel (dtypes in turn), at a
    rank that crosses rank tiles of every width."""
    dtype = list(DTYPES)[i % 3]
    args64 = [t.to(DTYPES[dtype]).double() for t in _layer(40 + i, m=70, n=50, k=20, r=70)]
    with tiles(tn=tnk._TN_CONFIGS[i % len(tnk._TN_CONFIGS)], expand=lowrank._CONFIGS[i % len(lowrank._CONFIGS)]):
        got = project(*(t.to(DTYPES[dtype]).to(DEV) for t in args64), "prolora")
    _check_projection(got, args64, "prolora", f"configuration {i} {dtype}")


def test_projection_batched_meets_the_reference_per_layer_from_strided_inputs():
    """Three layers in one set of launches, each against its own float64 reference; the same
    layers from strided views (every matrix column-major, A read with a step of 2) give the same
    bits (the kernels read strides, nothing is copied); a layer alone gets the bits it gets in
    the batch (no tile depends on the batch)."""
    layers = [_layer(s, m=40, n=36, k=12, r=5) for s in (10, 11, 12)]
    contig = [torch.stack([lay[i].float() for lay in layers]).to(DEV) for i in range(6)]
    strided = [t.mT.contiguous().mT for t in contig]
    wide = torch.zeros(3, 5, 72, device=DEV)
    wide[:, :, ::2] = contig[1]
    strided[1] = wide[:, :, ::2]
    assert not any(t.is_contiguous() for t in strided)
    up, down = project_batched(*contig, "prolora")
    up_s, down_s = project_batched(*strided, "prolora")
    for i, lay in enumerate(layers):
        _check_projection((up[i], down[i]), [t.float().double() for t in lay], "prolora", f"layer {i}")
    if interpreting():
        assert torch.equal(up_s, up) and torch.equal(down_s, down)
    else:  # compiled, other layouts may take other load paths; the arithmetic is the same
        assert torch.allclose(up_s, up, rtol=1e-6, atol=1e-6) and torch.allclose(down_s, down, rtol=1e-6, atol=1e-6)
    alone = project(*(t[1] for t in contig), "prolora")
    assert torch.equal(alone[0], up[1]) and torch.equal(alone[1], down[1])


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
    # phi is the mean squared principal cosine (the definition, in float64; orthonormal pair 0)
    assert float(ours[0]) == pytest.approx(float((principal_cosines(A[0], B[0]) ** 2).mean()), abs=1e-5)


# ---- dispatch ----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_a_gpu_triton_is_never_chosen_and_says_why():
    assert backends_triton.triton_missing() == NO_GPU
    for op in (project_lora, truncated_svd, subspace_phi):
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
