"""Native (prolora._C) backends of small_svd and truncated_svd, and the dispatch rules that pick
them: on CPU by the measured crossover, on CUDA by the measured-winners table (ops.measured).

Accuracy is judged against torch.linalg in the same precision (our float64 error <= RATIO x
torch's float32 error, floored at float32 eps); vectors only through reconstruction,
orthogonality and principal angles.
"""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_kernels
from prolora import _native
from prolora.method import KMode
from prolora.ops import Problem, phi, small_svd, truncated_svd
from prolora.ops import measured
from prolora.ops.backends_native import CPU_SVD_MAX
from prolora.ops.registry import problem_for
from prolora.synthetic import generator, spectral_weight

needs_native = pytest.mark.skipif(not _native.available(), reason=str(_native.why_unavailable()))
RATIO = 2.0
EPS32 = torch.finfo(torch.float32).eps


def recon_err(U, S, Vh, X64: torch.Tensor) -> float:
    R = (U.double() * S.double().unsqueeze(-2)) @ Vh.double()
    return float((R - X64).norm() / X64.norm())


def orth_err(U: torch.Tensor) -> float:
    U = U.double()
    eye = torch.eye(U.shape[-1], dtype=torch.float64)
    return float((U.mT @ U - eye).abs().max())


# ---- small_svd/native --------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("shape", [(64, 8, 8), (5, 4, 4), (3, 6, 9), (7, 16, 16), (6, 6)])
def test_native_small_svd_meets_the_contract(shape):
    g = torch.Generator().manual_seed(sum(shape))
    X = torch.randn(*shape, generator=g, dtype=torch.float64)
    U, S, Vh = small_svd.backends["native"].fn(X.float())
    Ut, St, Vht = small_svd.backends["torch"].fn(X.float())
    U0, S0, Vh0 = small_svd.reference.fn(X)
    assert U.dtype == torch.float32 and U.shape == Ut.shape and S.shape == St.shape and Vh.shape == Vht.shape
    assert recon_err(U, S, Vh, X) <= RATIO * max(recon_err(Ut, St, Vht, X), EPS32)
    assert orth_err(U) <= RATIO * max(orth_err(Ut), EPS32) and orth_err(Vh.mT) <= RATIO * max(orth_err(Vht.mT), EPS32)
    s_err = float((S.double() - S0).abs().max() / S0.max())
    assert s_err <= RATIO * max(float((St.double() - S0).abs().max() / S0.max()), EPS32)
    assert bool((S[..., :-1] >= S[..., 1:]).all())  # descending


@needs_native
def test_native_small_svd_float64_and_half_inputs():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 8, 8, generator=g, dtype=torch.float64)
    U, S, Vh = small_svd.backends["native"].fn(X)
    assert U.dtype == torch.float64 and recon_err(U, S, Vh, X) < 1e-13
    U, S, Vh = small_svd.backends["native"].fn(X.half())  # solved in float32
    assert U.dtype == torch.float32
    assert recon_err(U, S, Vh, X.half().double()) < 1e-5


def test_cpu_dispatch_takes_native_only_up_to_the_measured_crossover():
    small = torch.zeros(100, CPU_SVD_MAX, CPU_SVD_MAX)
    large = torch.zeros(100, 32, 32)
    want = "native" if _native.available() else "torch"
    assert small_svd.choose(problem_for(small)).backend.name == want
    assert small_svd.choose(problem_for(small[0])).backend.name == want
    c = small_svd.choose(problem_for(large))
    assert c.backend.name == "torch"
    if _native.available():
        assert "LAPACK gesdd is faster" in c.rejected["native"]
        # without a shape the CPU rule cannot apply: torch, and the reason says so
        c = small_svd.choose(Problem(device="cpu", dtype="float32"))
        assert c.backend.name == "torch" and "chosen per shape" in c.rejected["native"]
    else:
        assert c.rejected["native"].startswith("native module not built")


# ---- truncated_svd/gram-jacobi --------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("shape", [(40, 72), (72, 40)])
def test_gram_jacobi_basis_meets_the_contract(shape):
    W = spectral_weight(shape, generator("native", str(shape))).half()
    d = min(shape)
    mode = KMode.parse("energy:0.9")
    chooser = lambda S, e: mode.choose(d, S, e)  # noqa: E731
    exact = truncated_svd.reference.fn(W, chooser)
    base = truncated_svd.backends["gram"].fn(W, exact.k)
    fast = truncated_svd.backends["gram-jacobi"].fn(W, chooser)
    assert fast.k == exact.k and fast.U.dtype == torch.float32
    for side in ("U", "V"):
        ours = phi(getattr(exact, side), getattr(fast, side).double())
        theirs = phi(getattr(exact, side), getattr(base, side).double())
        assert ours >= 0.999 and 1 - ours <= RATIO * max(1 - theirs, EPS32)
    assert fast.energy == pytest.approx(exact.energy, rel=1e-5)
    s_err = float((fast.S.double() - exact.S).abs().max() / exact.S[0])
    assert s_err <= RATIO * max(float((base.S.double() - exact.S).abs().max() / exact.S[0]), EPS32)


@needs_native
def test_gram_jacobi_batched_equals_single():
    Ws = torch.stack([spectral_weight((30, 50), generator("nb", s)) for s in range(3)])
    fn = truncated_svd.backends["gram-jacobi"].fn
    batch = fn(Ws, [4, 9, None])
    assert [b.k for b in batch] == [4, 9, 30]
    one = fn(Ws[1], 9)
    assert torch.equal(batch[1].U, one.U) and torch.equal(batch[1].S, one.S)


def test_gram_jacobi_is_never_chosen_on_cpu():
    c = truncated_svd.choose(Problem(device="cpu", dtype="float32", shape=(320, 320), batch=64))
    assert c.backend.name != "gram-jacobi"
    reason = c.rejected["gram-jacobi"]
    assert ("LAPACK syevd beats" in reason) if _native.available() else reason.startswith("native module")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_launchers_say_why_they_cannot_run():
    if not _native.available():
        pytest.skip(str(_native.why_unavailable()))
    why = _native.cuda_unavailable_reason()
    if not _native._C.has_cuda():
        assert why == "prolora._C was built without CUDA (no working nvcc at build time)"
    else:  # built with CUDA, no usable device: the CUDA runtime's own error, verbatim
        status = _native._C.cuda_status()
        assert status and why == f"prolora._C cannot use CUDA: {status}"


# ---- the measured-winners table -------------------------------------------------------------------


def table(*points, device="GPU-X"):
    return measured.parse({"device": device, "points": [
        dict(op="truncated_svd", backend=b, dtype="float32", shape=list(s), batch=n, speedup=x, accurate=a)
        for b, s, n, x, a in points]})


def test_verdict_without_measurements_keeps_torch():
    p = Problem(device="cuda", dtype="float32", shape=(320, 320), batch=8)
    why = measured.verdict("truncated_svd", "gram-triton", p, points=(), device="GPU-X")
    assert "no measurement" in why and "torch stays the default" in why


def test_verdict_picks_the_fastest_accurate_backend_of_the_nearest_case():
    pts = table(("gram-triton", (320, 320), 8, 2.0, True), ("gram-jacobi", (320, 320), 8, 3.0, True),
                ("gram-triton", (1280, 5120), 8, 1.5, True), ("gram-jacobi", (1280, 5120), 8, 0.4, True),
                ("gram-jacobi", (2048, 2048), 8, 9.0, False))  # fast but inaccurate: never a winner
    v = lambda b, shape, n=8: measured.verdict("truncated_svd", b, Problem(  # noqa: E731
        device="cuda", dtype="float32", shape=shape, batch=n), points=pts, device="GPU-X")
    assert v("gram-jacobi", (300, 330)) is None
    assert "gram-jacobi is faster" in v("gram-triton", (300, 330))
    assert v("gram-triton", (1280, 4096)) is None
    assert "nothing beats torch" in v("gram-jacobi", (2048, 2048))
    # another device, another dtype: no measurement
    assert "no measurement" in measured.verdict("truncated_svd", "gram-triton", Problem(
        device="cuda", dtype="float32", shape=(320, 320)), points=pts, device="GPU-Y")
    # no shape: chosen only when it wins every measured case
    none = Problem(device="cuda", dtype="float32")
    assert "without a shape" in measured.verdict("truncated_svd", "gram-triton", none, points=pts, device="GPU-X")
    only = table(("gram-triton", (320, 320), 8, 2.0, True), ("gram-triton", (640, 640), 8, 1.2, True))
    assert measured.verdict("truncated_svd", "gram-triton", none, points=only, device="GPU-X") is None
    slow = table(("gram-triton", (320, 320), 8, 1.01, True))
    assert "nothing beats torch" in measured.verdict("truncated_svd", "gram-triton", Problem(
        device="cuda", dtype="float32", shape=(320, 320)), points=slow, device="GPU-X")


def test_table_file_is_read_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"device": "GPU-X", "points": [
        {"op": "small_svd", "backend": "native", "dtype": "float32", "shape": [16, 16], "batch": 512,
         "speedup": 4.0, "accurate": True}]}))
    monkeypatch.setenv(measured.ENV_VAR, str(path))
    assert measured.table_path() == path
    pts = measured.load_points()
    assert len(pts) == 1 and pts[0].wins and pts[0].device == "GPU-X"
    path.write_text("{not json")
    assert measured.load_points() == ()  # a broken table counts as none: torch stays
    with pytest.raises(ValueError, match="malformed"):
        measured.parse({"points": [{"op": "x"}]})


# ---- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_native
def test_cuda_small_svd_and_gram_jacobi_match_cpu():
    if _native.cuda_unavailable_reason():
        pytest.skip(_native.cuda_unavailable_reason())
    g = torch.Generator().manual_seed(2)
    X = torch.randn(256, 24, 24, generator=g, dtype=torch.float64)
    U, S, Vh = small_svd.backends["native"].fn(X.float().cuda())
    Ut, St, Vht = small_svd.backends["torch"].fn(X.float().cuda())
    assert recon_err(U.cpu(), S.cpu(), Vh.cpu(), X) <= RATIO * max(recon_err(Ut.cpu(), St.cpu(), Vht.cpu(), X), EPS32)
    W = spectral_weight((96, 160), generator("gpu", 0)).half()
    exact = truncated_svd.reference.fn(W, 40)
    fast = truncated_svd.backends["gram-jacobi"].fn(W.cuda(), 40)
    assert phi(exact.U, fast.U.cpu().double()) >= 0.999 and phi(exact.V, fast.V.cpu().double()) >= 0.999


def test_benchmark_json_becomes_a_table_that_dispatch_reads(tmp_path, monkeypatch):
    """benchmarks/bench_kernels.py `winners`: pytest-benchmark rows -> the ops.measured table."""
    def row(backend, median, accurate=True, shape=(640, 640), op="truncated_svd", device="cuda"):
        info = dict(op=op, backend=backend, dtype="float16", shape=list(shape), batch=16, device=device,
                    accurate=accurate)
        return {"group": f"{op} {shape} {device}", "extra_info": info, "stats": {"median": median}}

    rows = [row("gram", 1.0), row("gram-triton", 0.5), row("gram-jacobi", 0.25, accurate=False),
            row("reference", 9.0), row("svd_lowrank", 0.1),  # neither is a dispatch candidate
            row("gram", 1.0, shape=(64, 64)), row("gram-triton", 2.0, shape=(64, 64)),
            row("gram-triton", 0.1, device="cpu", shape=(8, 8))]  # CPU rows never count
    table = bench_kernels.winners({"benchmarks": rows}, "GPU-X")
    got = {(p["backend"], tuple(p["shape"])): (p["speedup"], p["accurate"]) for p in table["points"]}
    assert got == {("gram-triton", (640, 640)): (2.0, True), ("gram-jacobi", (640, 640)): (4.0, False),
                   ("gram-triton", (64, 64)): (0.5, True)}
    file = tmp_path / "gpu_winners.json"
    file.write_text(json.dumps(table))
    monkeypatch.setenv(measured.ENV_VAR, str(file))
    p = Problem(device="cuda", dtype="float16", shape=(600, 700), batch=16)
    assert measured.verdict("truncated_svd", "gram-triton", p, device="GPU-X") is None
    assert "nothing beats torch" in measured.verdict(
        "truncated_svd", "gram-triton", Problem(device="cuda", dtype="float16", shape=(64, 64), batch=16),
        device="GPU-X")
    assert measured.verdict("truncated_svd", "gram-jacobi", p, device="GPU-X") is not None  # inaccurate
