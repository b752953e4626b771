"""Kernel benchmarks (pytest-benchmark): per op, the reference, the torch fast path, the native
and Triton backends and the backend dispatch picks ("auto"), side by side in one run, with
accuracy figures in extra_info. CPU suites always run; GPU suites are marked `gpu` and skip
without a CUDA device.

    pytest benchmarks/bench_kernels.py --benchmark-enable --benchmark-timer time.process_time  # CPU
    pytest benchmarks/bench_kernels.py --benchmark-enable -m gpu --benchmark-json b.json
    python benchmarks/bench_kernels.py winners gpu_winners.json b.json [more.json ...]

CPU suites run on one thread (torch and the native launcher alike) and are best timed with
--benchmark-timer time.process_time: on a shared machine wall time mostly measures the other
processes, and one thread per side compares the solvers, not the schedulers (with all cores
the native launcher also spreads a batch over threads, which torch's batched SVD does not).

`winners` turns a benchmark JSON into the table ops.measured reads: per case, each registered
fast backend's speedup over the torch baseline of its op, and whether it met the accuracy
contract there.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Callable

import pytest
import torch

from prolora.ops import Problem, phi, project_lora, small_svd, subspace_phi, truncated_svd
from prolora.ops.registry import problem_for as svd_problem
from prolora.synthetic import generator, spectral_weight

# the torch fast path each backend is measured against (the default dispatch picks today)
BASELINE = {"truncated_svd": "gram", "topk_eigh": "eigh", "project_lora": "torch", "subspace_phi": "torch",
            "small_svd": "torch"}
RATIO = 2.0  # accuracy contract: error vs float64 at most RATIO x torch's in the same precision
EPS32 = torch.finfo(torch.float32).eps
HAS_GPU = torch.cuda.is_available()
# PROLORA_GPU_BENCH=quick (what gpu_check.sh runs in its time budget): the GPU cases the engine
# meets (fp16 weights at SDXL's and Flux's sizes, float32 projections), no full-SVD reference
# rows and no Jacobi eigensolver above 640; anything else: every case
QUICK = os.environ.get("PROLORA_GPU_BENCH", "full") == "quick"


@pytest.fixture(autouse=True)
def _one_cpu_thread(request):
    if request.node.get_closest_marker("gpu"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sync_wrap(fn: Callable, cuda: bool) -> Callable:
    if not cuda:
        return fn

    def run(*a):
        out = fn(*a)
        torch.cuda.synchronize()
        return out
    return run


def measure(benchmark, fn: Callable, args: tuple, *, op: str, backend: str, dtype: torch.dtype,
            shape: tuple, batch: int, cuda: bool = False, rounds: int = 5):
    """Times fn(*args) (median over rounds, after a warm-up) and records what it ran."""
    benchmark.group = f"{op} {str(dtype).removeprefix('torch.')} {'x'.join(map(str, shape))} b={batch}" + \
        (" cuda" if cuda else " cpu")
    benchmark.extra_info.update(op=op, backend=backend, dtype=str(dtype).removeprefix("torch."),
                                shape=list(shape), batch=batch, device="cuda" if cuda else "cpu")
    return benchmark.pedantic(_sync_wrap(fn, cuda), args=args, rounds=rounds, warmup_rounds=1, iterations=1)


def record_accuracy(benchmark, err: float, baseline_err: float | None, **more) -> None:
    ok = baseline_err is None or err <= RATIO * max(baseline_err, EPS32)
    benchmark.extra_info.update(err=err, baseline_err=baseline_err, accurate=bool(ok), **more)


# ---- small_svd: the native Jacobi solver for many small matrices ----------------------------------


def _native_cuda_missing() -> str | None:
    from prolora import _native

    return _native.cuda_unavailable_reason()


def _recon(U, S, Vh, X64):
    R = (U.double() * S.double().unsqueeze(-2)) @ Vh.double()
    return float((R - X64).norm() / X64.norm())


SMALL_CASES = [(1, 8), (256, 8), (256, 12), (256, 16), (256, 32), (64, 64)]


def _small_svd_bench(benchmark, backend: str, b: int, n: int, device: str):
    X64 = torch.randn(b, n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    X = X64.float().to(device)
    if backend == "auto":
        fn = small_svd.choose(svd_problem(X)).backend.fn
    else:  # measured even where dispatch would not pick it: that is what the rows are for
        be = small_svd.backends[backend]
        why = be.available() or (_native_cuda_missing() if backend == "native" and device == "cuda" else None)
        if why:
            pytest.skip(why)
        fn = be.fn
    X_in = X if b > 1 else X[0]
    out = measure(benchmark, fn, (X_in,), op="small_svd", backend=backend, dtype=torch.float32,
                  shape=(n, n), batch=b, cuda=device == "cuda", rounds=5)
    U, S, Vh = (t.cpu() for t in out)
    base = small_svd.backends["torch"].fn(X_in)
    ref64 = X64 if b > 1 else X64[0]
    record_accuracy(benchmark, _recon(U, S, Vh, ref64), _recon(*(t.cpu() for t in base), ref64))
    if backend == "auto":
        benchmark.extra_info["chose"] = small_svd.choose(svd_problem(X)).backend.name


@pytest.mark.parametrize("backend", ["torch", "native", "auto"])
@pytest.mark.parametrize("b,n", SMALL_CASES)
def test_small_svd_cpu(benchmark, backend, b, n):
    _small_svd_bench(benchmark, backend, b, n, "cpu")


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("b,n", [(2048, 16), (128, 128)] if QUICK else
                         [(2048, 8), (2048, 16), (2048, 32), (512, 64), (128, 128)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_small_svd_gpu(benchmark, backend, b, n):
    _small_svd_bench(benchmark, backend, b, n, "cuda")


def _compress(up: torch.Tensor, down: torch.Tensor, rank: int, svd: Callable):
    """method.compress with its core SVD taken from `svd` (the proposed small_svd wiring)."""
    Q1, R1 = torch.linalg.qr(up)
    Q2, R2 = torch.linalg.qr(down.T)
    Uc, Sc, Vch = svd(R1 @ R2.T)
    root = Sc[:rank].sqrt()
    return (Q1 @ Uc[:, :rank]) * root, root[:, None] * (Vch[:rank] @ Q2.T)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("r", [4, 16])
def test_compress_cpu(benchmark, backend, r):
    """The whole per-layer compress step (2 QRs + the 2r x 2r core SVD) over 32 layers of
    1280 x 1280, with the core SVD from torch or from small_svd dispatch (native up to 12x12)."""
    g = torch.Generator().manual_seed(r)
    layers = [(torch.randn(1280, 2 * r, generator=g), torch.randn(2 * r, 1280, generator=g)) for _ in range(32)]
    core = torch.zeros(2 * r, 2 * r)
    svd = small_svd.backends["torch"].fn if backend == "torch" else small_svd.choose(svd_problem(core)).backend.fn
    benchmark.extra_info["core_svd"] = "torch" if backend == "torch" else small_svd.choose(svd_problem(core)).backend.name

    def run():
        return [_compress(u, d, r, svd) for u, d in layers]
    out = measure(benchmark, run, (), op="compress", backend=backend, dtype=torch.float32,
                  shape=(1280, 1280), batch=32, rounds=5)
    errs = []
    for (u, d), (nu, nd) in zip(layers[:4], out[:4]):
        U, S, Vh = torch.linalg.svd(u.double() @ d.double())
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        errs.append(float((nu.double() @ nd.double() - best).norm() / best.norm()))
    record_accuracy(benchmark, max(errs), None)


# ---- truncated_svd: the basis ------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _weights(b: int, m: int, n: int) -> torch.Tensor:
    return torch.stack([spectral_weight((m, n), generator("bench", i, m, n)) for i in range(b)])


_EXACT: dict[tuple, list] = {}


def _exact(W: torch.Tensor, k: int, key: tuple):
    if key not in _EXACT:
        dev = W.device
        _EXACT[key] = [truncated_svd.reference.fn(w.to(dev), k) for w in W]
    return _EXACT[key]


def _svd_lowrank(W: torch.Tensor, k: int, dtype=None):
    """torch.svd_lowrank (randomized, 2 power iterations) per matrix: fast, but see docs/performance.md."""
    from prolora.ops import Basis

    out = []
    for w in W:
        U, S, V = torch.svd_lowrank(w.float(), q=k, niter=2)
        out.append(Basis(U, S, V, float((w.double() ** 2).sum())))
    return out


def _svd_bench(benchmark, backend: str, b: int, m: int, n: int, dtype: torch.dtype, device: str, rounds: int):
    W = _weights(b, m, n).to(dtype).to(device)
    k = min(m, n) // 2
    if backend == "svd_lowrank":
        fn = _svd_lowrank
    elif backend == "auto":
        p = Problem(device=device, dtype=str(dtype).removeprefix("torch."), shape=(m, n), batch=b, k=k)
        fn = truncated_svd.choose(p).backend.fn
        benchmark.extra_info["chose"] = truncated_svd.choose(p).backend.name
    else:
        be = truncated_svd.backends[backend]
        why = be.available() or (_native_cuda_missing() if "jacobi" in backend and device == "cuda" else None)
        if why:
            pytest.skip(why)
        fn = be.fn
    # "reference" here is what existing tools do: a full float32 torch.linalg.svd per matrix
    args = (W, k, torch.float32) if backend == "reference" else (W, k)
    out = measure(benchmark, fn, args, op="truncated_svd", backend=backend, dtype=dtype,
                  shape=(m, n), batch=b, cuda=device == "cuda", rounds=rounds)
    exact = _exact(W, k, (b, m, n, str(dtype), device))
    phis = [min(phi(e.U, o.U.double()), phi(e.V, o.V.double())) for e, o in zip(exact, out)]
    worst = min(phis)
    benchmark.extra_info.update(phi_min=worst, gap=exact[0].gap())
    record_accuracy(benchmark, 1 - worst, None)
    benchmark.extra_info["accurate"] = worst >= 0.999


@pytest.mark.parametrize("backend", ["reference", "gram", "gram-jacobi", "auto"])
@pytest.mark.parametrize("b,m,n", [(2, 320, 320), (1, 320, 1280)])
def test_truncated_svd_cpu(benchmark, backend, b, m, n):
    if backend == "gram-jacobi" and m > 320:
        pytest.skip("Jacobi eigh at this size on CPU: minutes (see the 320 row)")
    if backend == "gram-jacobi":
        from prolora import _native
        if not _native.available():
            pytest.skip(str(_native.why_unavailable()))
    _svd_bench(benchmark, backend, b, m, n, torch.float32, "cpu", rounds=3)


@pytest.mark.parametrize("backend", ([] if QUICK else ["reference"]) +
                         ["gram", "gram-triton", "gram-triton-jacobi", "gram-jacobi", "svd_lowrank"])
@pytest.mark.parametrize("dtype", [torch.float16] if QUICK else [torch.float16, torch.float32])
@pytest.mark.parametrize("b,m,n", [(16, 640, 640), (8, 1280, 1280), (4, 1280, 5120)] if QUICK else
                         [(64, 64, 64), (16, 320, 320), (16, 640, 640), (8, 1280, 1280), (4, 1280, 5120)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_truncated_svd_gpu(benchmark, backend, dtype, b, m, n):
    if QUICK and "jacobi" in backend and min(m, n) > 640:
        pytest.skip("quick: the Jacobi eigensolver above 640 (one CUDA block per matrix) is timed in full runs")
    _svd_bench(benchmark, backend, b, m, n, dtype, "cuda", rounds=3)


# ---- project_lora ----------------------------------------------------------------------------------


def _layers(b: int, m: int, n: int, k: int, r: int, dtype: torch.dtype, device: str):
    return [t.to(dtype).to(device) for t in _layers64(b, m, n, k, r)]


@functools.lru_cache(maxsize=2)
def _layers64(b: int, m: int, n: int, k: int, r: int):
    g = torch.Generator().manual_seed(m + n + k + r)

    def orth(rows):
        return torch.linalg.qr(torch.randn(b, rows, k, generator=g))[0]
    Us, Ut, Vs, Vt = orth(m), orth(m), orth(n), orth(n)
    B, A = torch.randn(b, m, r, generator=g), torch.randn(b, r, n, generator=g)
    return (B, A, Us, Vs, Ut, Vt)


def _project_bench(benchmark, backend: str, b, m, n, k, r, dtype, device, rounds):
    args = _layers(b, m, n, k, r, dtype, device)
    if backend == "triton-batched":
        be = project_lora.backends["triton"]
        if be.available():
            pytest.skip(be.available())
        from prolora.ops.backends_triton import project_batched

        def fn(*a):
            return project_batched(*a, "prolora")
    else:
        be = project_lora.backends[backend]
        if be.available():
            pytest.skip(be.available())

        def fn(*a):  # one call per layer, as the engine makes them
            outs = [be.fn(*(t[i] for t in a), "prolora") for i in range(b)]
            return torch.stack([u for u, _ in outs]), torch.stack([d for _, d in outs])
    up, down = measure(benchmark, fn, tuple(args), op="project_lora", backend=backend, dtype=dtype,
                       shape=(m, n), batch=b, cuda=device == "cuda", rounds=rounds)
    errs = []
    base_errs = []
    for i in range(min(b, 2)):
        exact = [t[i].double().cpu() for t in args]
        u0, d0 = project_lora.reference.fn(*exact, "prolora")
        ut, dt_ = project_lora.backends["torch"].fn(*(t[i] for t in args), "prolora")
        errs.append(float((up[i].double().cpu() - u0).norm() / u0.norm()))
        base_errs.append(float((ut.double().cpu() - u0).norm() / u0.norm()))
    item = args[0].element_size()
    moved = b * (item * (2 * m * k + 2 * n * k + m * r + n * r) + 4 * 2 * r * (m + n))
    benchmark.extra_info["bytes_min"] = moved  # each input read once, outputs written once
    record_accuracy(benchmark, max(errs), max(base_errs), k=k, r=r)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_project_lora_cpu(benchmark, backend):
    _project_bench(benchmark, backend, 4, 1280, 1280, 640, 16, torch.float32, "cpu", rounds=3)


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-batched"])
@pytest.mark.parametrize("dtype", [torch.float32] if QUICK else [torch.float16, torch.float32])
@pytest.mark.parametrize("b,m,n,k,r", [(32, 1280, 1280, 640, 16), (8, 3072, 3072, 1536, 32)] if QUICK else
                         [(32, 1280, 1280, 640, 16), (16, 640, 2560, 320, 64), (8, 3072, 3072, 1536, 32)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_project_lora_gpu(benchmark, backend, dtype, b, m, n, k, r):
    _project_bench(benchmark, backend, b, m, n, k, r, dtype, "cuda", rounds=5)


# ---- subspace_phi --------------------------------------------------------------------------------


def _phi_bench(benchmark, backend, b, m, k, dtype, device, rounds):
    g = torch.Generator().manual_seed(b + m + k)
    A = torch.linalg.qr(torch.randn(b, m, k, generator=g))[0]
    B = torch.linalg.qr(torch.randn(b, m, k, generator=g) + A)[0]
    exact = subspace_phi.reference.fn(A.double(), B.double())
    be = subspace_phi.backends[backend]
    if be.available():
        pytest.skip(be.available())
    A_, B_ = A.to(dtype).to(device), B.to(dtype).to(device)
    out = measure(benchmark, be.fn, (A_, B_), op="subspace_phi", backend=backend, dtype=dtype,
                  shape=(m, k), batch=b, cuda=device == "cuda", rounds=rounds)
    exact_q = subspace_phi.reference.fn(A_.double().cpu(), B_.double().cpu())
    base = subspace_phi.backends["torch"].fn(A_, B_).cpu()
    err = float((out.cpu() - exact_q).abs().max())
    record_accuracy(benchmark, err, float((base - exact_q).abs().max()), phi_mean=float(exact.mean()))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_subspace_phi_cpu(benchmark, backend):
    _phi_bench(benchmark, backend, 16, 640, 320, torch.float32, "cpu", rounds=3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32] if QUICK else [torch.float16, torch.float32])
@pytest.mark.parametrize("b,m,k", [(64, 1280, 640)] if QUICK else [(64, 1280, 640), (256, 320, 160)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_subspace_phi_gpu(benchmark, backend, dtype, b, m, k):
    _phi_bench(benchmark, backend, b, m, k, dtype, "cuda", rounds=5)


# ---- the measured-winners table ----------------------------------------------------------------


def winners(bench: dict, device: str, versions: dict | None = None) -> dict:
    """The ops.measured table from a pytest-benchmark JSON: one point per (case, registered fast
    backend) with its speedup over the op's torch baseline in the same case (medians)."""
    from prolora.ops import ALL_OPS

    registered = {o.name: o for o in ALL_OPS}
    rows = [b for b in bench.get("benchmarks", []) if b.get("extra_info", {}).get("device") == "cuda"]
    by_group: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_group.setdefault(r["group"], {})[r["extra_info"]["backend"]] = r
    points = []
    for group, backends in sorted(by_group.items()):
        any_row = next(iter(backends.values()))["extra_info"]
        op = any_row["op"]
        base = backends.get(BASELINE.get(op, ""))
        if base is None:
            continue
        t0 = base["stats"]["median"]
        for name, r in sorted(backends.items()):
            info = r["extra_info"]
            known = registered[op].backends if op in registered else {}
            if name == BASELINE[op] or name not in known or known[name].reference:
                continue  # baselines, the reference and informational rows are not candidates
            t = r["stats"]["median"]
            points.append(dict(op=op, backend=name, dtype=info["dtype"], shape=info["shape"], batch=info["batch"],
                               speedup=round(t0 / t, 4) if t > 0 else 0.0, accurate=bool(info.get("accurate")),
                               median_s=t, baseline_median_s=t0))
    return {"device": device, "versions": versions or {}, "points": points}


def _winners_main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python benchmarks/bench_kernels.py winners OUT_JSON BENCH_JSON [BENCH_JSON ...]",
              file=sys.stderr)
        return 2
    from prolora.ops.measured import MIN_SPEEDUP

    out_path, inputs = argv[0], argv[1:]
    bench = {"benchmarks": [b for path in inputs for b in json.loads(open(path).read()).get("benchmarks", [])]}
    device = torch.cuda.get_device_name() if HAS_GPU else "none (no CUDA device: no GPU rows)"
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda or ""}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        pass
    table = winners(bench, device, versions)
    table["min_speedup"] = MIN_SPEEDUP
    with open(out_path, "w") as f:
        json.dump(table, f, indent=1)
    wins = [p for p in table["points"] if p["accurate"] and p["speedup"] >= MIN_SPEEDUP]
    print(f"{len(table['points'])} measured points, {len(wins)} wins over torch -> {out_path}")
    for p in table["points"]:
        print(f"  {p['op']:<14} {p['backend']:<19} {p['dtype']:<8} {'x'.join(map(str, p['shape'])):>10} "
              f"b={p['batch']:<5} {p['speedup']:7.2f}x {'ok' if p['accurate'] else 'INACCURATE'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "winners":
        sys.exit(_winners_main(sys.argv[2:]))
    print(__doc__)
    sys.exit(2 if len(sys.argv) > 1 else 0)
