"""prolora._native (the compiled prolora._C) against a float64 torch.linalg reference.

Errors are measured in float64 and judged, for float32, against the error of torch.linalg in
float32 on the same input (the FlashAttention habit), for float64 against a fixed 1e-12.
Singular/eigen vectors are never compared directly: reconstruction, orthogonality and the
spectrum determine a correct factorization whatever the signs or the basis of a repeated value.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from prolora import _native as nv
from prolora.errors import NativeUnavailableError

needs_native = pytest.mark.skipif(not nv.available(), reason=str(nv.why_unavailable()))

F64_TOL = 1e-12
RATIO = 4.0  # float32: our error <= RATIO * torch's float32 error + FLOOR
FLOOR = 2 * torch.finfo(torch.float32).eps


def test_native_required_in_ci():
    if os.environ.get("PROLORA_REQUIRE_NATIVE") != "1":
        pytest.skip("PROLORA_REQUIRE_NATIVE is not 1")
    assert nv.available(), nv.why_unavailable()


def test_unavailable_is_explained():
    if nv.available():
        assert nv.why_unavailable() is None
    else:
        assert nv.why_unavailable().startswith("native module not built")
        with pytest.raises(NativeUnavailableError):
            nv.batched_svd(torch.eye(2))


# ---- inputs ---------------------------------------------------------------------------------


def _orthogonal(g: torch.Generator, b: int, n: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(b, n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def _with_spectrum(g: torch.Generator, b: int, m: int, n: int, s: torch.Tensor) -> torch.Tensor:
    """(b, m, n) float64 matrices with singular values s (k = min(m, n) of them)."""
    k = min(m, n)
    u = _orthogonal(g, b, m)[..., :k]
    v = _orthogonal(g, b, n)[..., :k]
    return (u * s) @ v.mT


def make_matrix(kind: str, b: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    if kind == "random":
        return torch.randn(b, m, n, generator=g, dtype=torch.float64)
    if kind == "rank_deficient":  # rank about k / 3
        r = max(1, k // 3)
        return torch.randn(b, m, r, generator=g, dtype=torch.float64) @ torch.randn(
            b, r, n, generator=g, dtype=torch.float64)
    if kind == "repeated":  # three distinct values, each repeated
        s = torch.tensor([3.0, 1.0, 0.25], dtype=torch.float64).repeat_interleave(k // 3 + 1)[:k]
        return _with_spectrum(g, b, m, n, s)
    if kind == "graded":  # singular values from 1 down to 1e-6
        return _with_spectrum(g, b, m, n, torch.logspace(0, -6, k, dtype=torch.float64))
    if kind == "zero":
        return torch.zeros(b, m, n, dtype=torch.float64)
    raise ValueError(kind)


def make_symmetric(kind: str, b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":  # indefinite
        x = torch.randn(b, n, n, generator=g, dtype=torch.float64)
        return (x + x.mT) / 2
    if kind == "gram":  # positive semidefinite, rank about n / 2
        x = torch.randn(b, n, max(1, n // 2), generator=g, dtype=torch.float64)
        return x @ x.mT
    if kind == "degenerate":  # eigenvalues 2, -1, 0.5, each repeated
        w = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64).repeat_interleave(n // 3 + 1)[:n]
        q = _orthogonal(g, b, n)
        return (q * w) @ q.mT
    if kind == "zero":
        return torch.zeros(b, n, n, dtype=torch.float64)
    raise ValueError(kind)


# ---- error measures (float64, worst over the batch) -----------------------------------------


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    norms = torch.linalg.matrix_norm(ref) if ref.dim() == 3 else torch.linalg.vector_norm(ref, dim=-1)
    return float((err / norms.clamp_min(torch.finfo(torch.float64).tiny)).max())


def _orth_err(q: torch.Tensor) -> float:
    q = q.double()
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    return float(torch.linalg.matrix_norm(q.mT @ q - eye).max()) if q.numel() else 0.0


def svd_errors(a64: torch.Tensor, u, s, v) -> dict[str, float]:
    u, s, v = u.double().cpu(), s.double().cpu(), v.double().cpu()
    ref = torch.linalg.svdvals(a64)
    return {
        "reconstruction": _rel(torch.linalg.matrix_norm((u * s.unsqueeze(-2)) @ v.mT - a64), a64),
        "orth_u": _orth_err(u),
        "orth_v": _orth_err(v),
        "values": _rel(torch.linalg.vector_norm(s - ref, dim=-1), ref),
    }


def eigh_errors(a64: torch.Tensor, w, v) -> dict[str, float]:
    w, v = w.double().cpu(), v.double().cpu()
    ref = torch.linalg.eigvalsh(a64).flip(-1)
    return {
        "reconstruction": _rel(torch.linalg.matrix_norm((v * w.unsqueeze(-2)) @ v.mT - a64), a64),
        "orth_v": _orth_err(v),
        "values": _rel(torch.linalg.vector_norm(w - ref, dim=-1), ref),
    }


def torch_svd(a: torch.Tensor):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u, s, vh.mT


def torch_eigh(a: torch.Tensor):
    w, v = torch.linalg.eigh(a)
    return w.flip(-1), v.flip(-1)


def assert_accurate(ours: dict[str, float], reference: dict[str, float] | None, dtype) -> None:
    for name, err in ours.items():
        if dtype == torch.float64:
            bound = F64_TOL
        else:
            bound = RATIO * reference[name] + FLOOR
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch float32: {reference and reference[name]})"


def check_svd(a64: torch.Tensor, dtype, device: str = "cpu", **kw) -> None:
    a = a64.to(dtype)
    u, s, v = nv.batched_svd(a.to(device), **kw)
    b, m, n = a.shape
    k = min(m, n)
    assert u.shape == (b, m, k) and s.shape == (b, k) and v.shape == (b, n, k)
    assert u.dtype == s.dtype == v.dtype == dtype and u.device.type == device
    assert bool((s[..., :-1] >= s[..., 1:]).all()), "singular values not descending"
    reference = None if dtype == torch.float64 else svd_errors(a64, *torch_svd(a))
    assert_accurate(svd_errors(a64, u, s, v), reference, dtype)


def check_eigh(a64: torch.Tensor, dtype, device: str = "cpu", **kw) -> None:
    a = a64.to(dtype)
    w, v = nv.batched_eigh(a.to(device), **kw)
    b, n, _ = a.shape
    assert w.shape == (b, n) and v.shape == (b, n, n) and w.dtype == v.dtype == dtype
    assert bool((w[..., :-1] >= w[..., 1:]).all()), "eigenvalues not descending"
    reference = None if dtype == torch.float64 else eigh_errors(a64, *torch_eigh(a))
    assert_accurate(eigh_errors(a64, w, v), reference, dtype)


DTYPES = [torch.float64, torch.float32]
SVD_SHAPES = [(1, 1, 1), (3, 2, 2), (5, 7, 3), (5, 3, 7), (64, 32, 32), (16, 64, 16), (2, 128, 128)]
EIGH_SIZES = [(1, 1), (3, 2), (4, 7), (16, 32), (4, 64), (2, 128)]


# ---- SVD --------------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SVD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_svd_random(shape, dtype):
    check_svd(make_matrix("random", *shape), dtype)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["rank_deficient", "repeated", "graded", "zero"])
@pytest.mark.parametrize("shape", [(4, 7, 3), (4, 3, 7), (8, 32, 32), (2, 64, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_svd_special(kind, shape, dtype):
    check_svd(make_matrix(kind, *shape), dtype)


@needs_native
def test_svd_zero_matrix_is_exact():
    u, s, v = nv.batched_svd(torch.zeros(2, 5, 3))
    assert bool((s == 0).all())
    assert _orth_err(u) < 1e-6 and _orth_err(v) < 1e-6


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_svd_non_contiguous(dtype):
    base = make_matrix("random", 6, 24, 40, seed=3).to(dtype)
    for a in (base.mT, base[:, ::2, 1::3], base[0].T.expand(3, 40, 24)):
        assert not a.is_contiguous()
        check_svd(a.double(), dtype)
        u, s, v = nv.batched_svd(a)
        u2, s2, v2 = nv.batched_svd(a.contiguous())
        assert torch.equal(s, s2) and torch.equal(u, u2) and torch.equal(v, v2)


@needs_native
def test_svd_single_matrix_and_empty():
    a = make_matrix("random", 1, 6, 4)[0]
    u, s, v = nv.batched_svd(a)
    assert u.shape == (6, 4) and s.shape == (4,) and v.shape == (4, 4)
    u, s, v = nv.batched_svd(torch.zeros(0, 5, 3))
    assert u.shape == (0, 5, 3) and s.shape == (0, 3) and v.shape == (0, 3, 3)
    u, s, v = nv.batched_svd(torch.zeros(2, 0, 3))
    assert u.shape == (2, 0, 0) and s.shape == (2, 0) and v.shape == (2, 3, 0)


@needs_native
def test_svd_threads_do_not_change_results():
    a = make_matrix("random", 9, 20, 12).float()
    one = nv.batched_svd(a, threads=1)
    two = nv.batched_svd(a, threads=2)
    assert all(torch.equal(x, y) for x, y in zip(one, two))


@needs_native
def test_svd_sweeps_reported():
    a = make_matrix("random", 3, 64, 64)
    *_, sweeps = nv.batched_svd(a, return_sweeps=True)
    assert sweeps.dtype == torch.int32 and bool(((sweeps > 1) & (sweeps < 30)).all())
    *_, sweeps = nv.batched_svd(a, max_sweeps=1, return_sweeps=True)
    assert bool((sweeps == -1).all())


@needs_native
def test_svd_nan_does_not_hang():
    a = torch.randn(2, 8, 8)
    a[0, 3, 3] = float("nan")
    u, s, v = nv.batched_svd(a)
    assert bool(torch.isnan(s[0]).any()) and not bool(torch.isnan(s[1]).any())


@needs_native
def test_extreme_scales():
    """Inputs are scaled by a power of two inside: no overflow or underflow near float32's ends."""
    a = make_matrix("random", 2, 16, 16).float()
    sym = make_symmetric("random", 2, 16).float()
    for scale in (1e-30, 1e30):
        check_svd((a * scale).double(), torch.float32)
        check_eigh((sym * scale).double(), torch.float32)


@needs_native
def test_bad_arguments():
    with pytest.raises(TypeError):
        nv.batched_svd(torch.eye(3, dtype=torch.float16))
    with pytest.raises(ValueError):
        nv.batched_svd(torch.ones(3))
    with pytest.raises(ValueError):
        nv.batched_eigh(torch.ones(3, 4))
    with pytest.raises(ValueError):
        nv.batched_svd(torch.eye(3), max_sweeps=0)


# ---- symmetric eigensolver ---------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "gram", "degenerate", "zero"])
@pytest.mark.parametrize("size", EIGH_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_eigh(kind, size, dtype):
    check_eigh(make_symmetric(kind, *size), dtype)


@needs_native
def test_eigh_reads_lower_triangle_only():
    a = make_symmetric("random", 3, 9)
    garbage = a + torch.triu(torch.randn(3, 9, 9, dtype=torch.float64), diagonal=1)
    w, v = nv.batched_eigh(garbage)
    w2, v2 = nv.batched_eigh(a)
    assert torch.equal(w, w2) and torch.equal(v, v2)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eigh_non_contiguous(dtype):
    a = make_symmetric("random", 4, 33, seed=5).to(dtype)
    check_eigh(a.mT.double(), dtype)  # symmetric, so the transposed view is the same matrix
    w, v = nv.batched_eigh(a.mT)
    w2, v2 = nv.batched_eigh(a.mT.contiguous())
    assert torch.equal(w, w2) and torch.equal(v, v2)


# ---- the CUDA schedule without a GPU ------------------------------------------------------------

CSRC = Path(__file__).resolve().parents[2] / "csrc"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_block_schedule_on_emulated_block(tmp_path):
    """csrc/check_block_team.cpp runs the shared math on one thread per lane (groups and lanes as
    the CUDA launcher uses warps and threads) under ThreadSanitizer: a missing barrier is a data
    race, a wrong schedule a mismatch with the serial run. Without a working ThreadSanitizer
    (no libtsan, or a kernel it cannot run on) the agreement check runs alone."""
    exe = tmp_path / "check_block_team"
    base = ["g++", "-std=c++17", "-O1", "-g", "-pthread", f"-I{CSRC}", str(CSRC / "check_block_team.cpp"), "-o", str(exe)]
    tsan = subprocess.run(base + ["-fsanitize=thread"], capture_output=True, timeout=300)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300) if tsan.returncode == 0 else None
    if run is None or "FATAL: ThreadSanitizer" in run.stderr:  # no libtsan, or an unsuitable kernel
        subprocess.run(base, check=True, capture_output=True, timeout=300)
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0 and "all agree" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


# ---- CUDA (built with CUDA and a GPU present; deselected by default) ---------------------------

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or nv.cuda_unavailable_reason() is not None,
    reason=f"needs a CUDA device and prolora._C able to use it: {nv.cuda_unavailable_reason()}")


@needs_native
def test_cuda_reason_is_explained():
    reason = nv.cuda_unavailable_reason()
    if not nv.has_cuda():
        assert "built without CUDA" in reason
    if reason is not None and torch.cuda.is_available():
        with pytest.raises(NativeUnavailableError, match="batched_svd"):
            nv.batched_svd(torch.eye(3, device="cuda"))


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SVD_SHAPES + [(4, 300, 40), (3, 40, 300)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["random", "rank_deficient", "repeated", "zero"])
def test_cuda_svd(kind, shape, dtype):
    check_svd(make_matrix(kind, *shape), dtype, device="cuda")


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "gram", "degenerate", "zero"])
@pytest.mark.parametrize("size", EIGH_SIZES + [(2, 200)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_eigh(kind, size, dtype):
    check_eigh(make_symmetric(kind, *size), dtype, device="cuda")


@gpu
@needs_gpu
def test_cuda_matches_cpu_and_uses_current_stream():
    a = make_matrix("random", 8, 48, 20, seed=7)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        u, s, v, sweeps = nv.batched_svd(a.cuda().mT, return_sweeps=True)
    stream.synchronize()
    _, s_cpu, _, sweeps_cpu = nv.batched_svd(a.mT, return_sweeps=True)
    assert bool((sweeps.cpu() > 0).all()) and bool((sweeps_cpu > 0).all())
    assert float((s.cpu() - s_cpu).abs().max()) <= 1e-12 * float(s_cpu.max())
    assert math.isfinite(float(u.sum())) and math.isfinite(float(v.sum()))
