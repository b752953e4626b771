"""Step (a) of benchmarks/gpu_check.sh: the symmetric eigensolver that a cold transfer is made
of (docs/performance.md, issue 26), timed on the GPU and on the host's cores side by side, in a
fixed time budget (30 s by default).

Per size n (640 and 1280: SDXL's Gram matrices; 3072: Flux's), float32 Gram matrices of
trained-like weights (synthetic spectral weights):
  gpu_one        one torch.linalg.eigh call (seconds per matrix)
  gpu_batch      a batch of b matrices in one call (cuSOLVER loops above n = 32)
  gpu_streams    the b matrices on s streams from s host threads (eigh waits for its error check
                 on the host, so streams fed from one thread would run one after another)
  cpu_all_cores  one eigh with all of torch's host threads
  cpu_per_core   the b matrices over a pool of host threads, one torch thread each
  new_solver     the slot for issue 26's truncated eigensolver (`find_new_solver`): when this
                 checkout's prolora.ops has it, it is timed at the transfer's k alone, eigh
                 alone on the same batch, and both together (each on its own stream and thread),
                 with its top-k eigenvalues and subspace checked against eigh's.
Every measurement has a deadline: what does not fit in the budget is recorded as skipped, and
the JSON is written whatever happens.

    python -m benchmarks.gpu_eigh --json eigh.json [--budget 20] [--sizes 640,1280,3072]

The budget counts from the first matrix; importing torch and starting CUDA come before it (the
step's 30 s cover both).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

NEW_SOLVER_ENV = "PROLORA_NEW_SOLVER"


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, budget: Budget, reps: int = 3, share: float = 1.0, warmup: bool | None = None) -> dict:
    """Median seconds of fn() over up to `reps` runs, never starting one past `share` of what is
    left of the budget. On a GPU a first, untimed run warms up (handles, workspaces, kernels);
    on the host every run counts (a single eigh of 3072 on one core takes seconds)."""
    warmup = device == "cuda" if warmup is None else warmup
    limit = time.perf_counter() + budget.left() * share
    times: list[float] = []
    first = None
    while len(times) < reps and time.perf_counter() < limit:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        if warmup and first is None:
            first = dt
        else:
            times.append(dt)
        if time.perf_counter() + dt > limit:
            break
    if not times:
        return {"skipped": "budget", **({"warmup_s": first} if first is not None else {})}
    return {"median_s": statistics.median(times), "runs": len(times)}


def grams(n: int, b: int, device: str) -> torch.Tensor:
    """b float32 Gram matrices W W^T of n x n trained-like weights (drawn on `device`)."""
    from prolora.synthetic import generator, spectral_weight

    out = []
    for i in range(b):
        W = spectral_weight((n, n), generator("eigh-bench", n, i, device=device if device == "cuda" else None))
        out.append(W @ W.T)
    return torch.stack(out)


def find_new_solver():
    """The slot for the new solver (issue 26, another branch): an op of prolora.ops named by
    $PROLORA_NEW_SOLVER, else the first op of prolora.ops.ALL_OPS besides the known four whose
    name holds "eig" (topk_eigh since issue 26). None where a checkout has none. It is called as its
    default backend's fn(G, k) on a batch of Gram matrices G (b, n, n) and may return (evals (b, k),
    evecs (b, n, k)), in any order, a list of Eig-like objects with .values (descending) and .vectors,
    or a list of Basis-like objects with .S (square roots of the eigenvalues) and .U."""
    import prolora.ops as ops

    name = os.environ.get(NEW_SOLVER_ENV)
    if name:
        return getattr(ops, name, None)
    known = {"truncated_svd", "project_lora", "subspace_phi", "small_svd"}
    return next((op for op in getattr(ops, "ALL_OPS", ()) if op.name not in known and "eig" in op.name), None)


def _as_pairs(out, k: int):
    """(evals (b, k) descending, evecs (b, n, k)) from what the new solver returned."""
    if isinstance(out, (list, tuple)) and out and hasattr(out[0], "vectors"):  # prolora.ops.Eig (topk_eigh)
        return (torch.stack([o.values[:k].to(o.vectors.device).float() for o in out]),
                torch.stack([o.vectors[:, :k] for o in out]))
    if isinstance(out, (list, tuple)) and out and hasattr(out[0], "U"):  # bases of G = W W^T: S^2 = evals
        return (torch.stack([o.S[:k].to(o.U.device).float() ** 2 for o in out]),
                torch.stack([o.U[:, :k] for o in out]))
    evals, evecs = out
    order = evals.argsort(dim=-1, descending=True)[..., :k]
    return evals.gather(-1, order), evecs.gather(-1, order.unsqueeze(-2).expand(*evecs.shape[:-1], k))


def _concurrently(jobs: list, device: str) -> None:
    """Each job on its own thread (and, on a GPU, its own stream); returns when all are done."""
    def run(job, stream):
        if stream is None:
            job()
            return
        with torch.cuda.stream(stream):
            job()
        stream.synchronize()
    streams = [torch.cuda.Stream() if device == "cuda" else None for _ in jobs]
    threads = [threading.Thread(target=run, args=(j, s)) for j, s in zip(jobs, streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def new_solver_rows(G: torch.Tensor, device: str, budget: Budget) -> dict:
    op = find_new_solver()
    if op is None:
        return {"present": False, "looked_for": os.environ.get(NEW_SOLVER_ENV) or "an op of prolora.ops with 'eig'"}
    n = G.shape[-1]
    k = n // 2
    try:
        from prolora.ops import Problem

        backend = op.choose(Problem(device=device, dtype="float32", shape=(n, n), batch=G.shape[0], k=k)).backend
        row = {"present": True, "op": op.name, "backend": backend.name, "k": k}
        evals, evecs = _as_pairs(backend.fn(G, k), k)
        w, v = torch.linalg.eigh(G)
        w, v = w.flip(-1)[..., :k], v.flip(-1)[..., :k]
        row["max_rel_eigenvalue_error"] = float(((evals - w).abs() / w.abs().clamp_min(1e-30)).max())
        overlap = (v.mT.double() @ evecs.double()).pow(2).sum((-2, -1)) / k
        row["min_subspace_phi"] = float(overlap.min())
        half = G.shape[0] // 2 or 1
        row["eigh"] = timed(lambda: torch.linalg.eigh(G), device, budget, share=0.3)
        row["new"] = timed(lambda: backend.fn(G, k), device, budget, share=0.4)
        row["both"] = timed(lambda: _concurrently([lambda: torch.linalg.eigh(G[:half]),
                                                    lambda: backend.fn(G[half:], k)], device),
                            device, budget, share=0.6)
        row["others"] = other_backend_rows(op, backend.name, G, k, device, budget)
        return row
    except Exception as exc:  # the slot must not cost the step
        return {"present": True, "op": getattr(op, "name", str(op)), "error": f"{type(exc).__name__}: {exc}"[:500]}


def other_backend_rows(op, default: str, G: torch.Tensor, k: int, device: str, budget: Budget) -> dict:
    """The op's other backends (not the reference, not the default) on the same batch: for a
    warm-started solver (topk_eigh's subspace) the start is the top-k eigenvectors of a related
    matrix (G plus a symmetric perturbation of 2% of its norm, as the other model of a pair gives),
    the way a transfer runs it; each row says how many matrices fell back to a dense solve."""
    rows = {}
    n = G.shape[-1]
    E = torch.randn(G.shape, generator=torch.Generator().manual_seed(26)).to(G.device, G.dtype)
    E = (E + E.mT) * (0.01 * G.norm(dim=(-2, -1), keepdim=True) / n)
    warm = list(torch.linalg.eigh(G + E)[1].flip(-1)[..., :k])
    for name, b in op.backends.items():
        if b.reference or name == default:
            continue
        try:
            fn = (lambda b=b: b.fn(G, k, warm=warm)) if "warm" in inspect.signature(b.fn).parameters else \
                (lambda b=b: b.fn(G, k))
            out = fn()
            fell = [getattr(o, "solver", "") for o in out] if isinstance(out, (list, tuple)) else []
            rows[name] = {"fallbacks": sum("fallback" in str(f) for f in fell),
                          **timed(fn, device, budget, share=0.5)}
        except Exception as exc:  # a backend that refuses this device or size: say so, go on
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return rows


def size_rows(G: torch.Tensor, streams: int, device: str, budget: Budget, share: float) -> dict:
    """Every row of one size (the batch G) within `share` of the budget left."""
    sub = Budget(budget.left() * share)
    b, n = G.shape[0], G.shape[-1]
    row: dict = {"n": n, "batch": b}
    if device == "cuda":
        row["gpu_one"] = timed(lambda: torch.linalg.eigh(G[0]), device, sub, share=0.15)
        row["gpu_batch"] = timed(lambda: torch.linalg.eigh(G), device, sub, share=0.2)
        parts = [G[i::streams] for i in range(streams)]
        row["gpu_streams"] = timed(lambda: _concurrently([lambda p=p: torch.linalg.eigh(p) for p in parts], device),
                                   device, sub, share=0.25)
        row["streams"] = streams
    host = G.cpu()
    cores = os.cpu_count() or 1
    row["cpu_all_cores"] = timed(lambda: torch.linalg.eigh(host[0]), "cpu", sub, reps=2, share=0.3)
    row["cpu_threads"] = torch.get_num_threads()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(cores) as pool:
            row["cpu_per_core"] = timed(lambda: list(pool.map(torch.linalg.eigh, host)), "cpu", sub, reps=1,
                                        share=0.6)
    finally:
        torch.set_num_threads(threads)
    row["cpu_cores"] = cores
    for key in ("gpu_batch", "gpu_streams", "cpu_per_core"):
        if "median_s" in row.get(key, {}):
            row[key]["per_matrix_s"] = row[key]["median_s"] / b
    row["new_solver"] = new_solver_rows(G, device, sub)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="640,1280,3072")
    ap.add_argument("--batch", default="8,8,4", help="matrices per batch, per size")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds for the measurements")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.sizes.split(",")]
    batches = [int(x) for x in a.batch.split(",")]
    result: dict = {"step": "eigh", "device": a.device, "budget_s": a.budget,
                    "device_name": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                    "torch": torch.__version__, "cpu_count": os.cpu_count(), "sizes": []}
    t0 = time.perf_counter()
    inputs = [grams(n, b, a.device) for n, b in zip(sizes, batches)]
    _sync(a.device)
    result["make_s"] = round(time.perf_counter() - t0, 2)
    budget = Budget(a.budget)
    weights = [1.0 + 1.5 * i for i in range(len(sizes))]  # 640: 1, 1280: 2.5, 3072: 4 parts
    try:
        for i, G in enumerate(inputs):
            share = weights[i] / sum(weights[i:])  # larger sizes get more of what is left
            try:
                result["sizes"].append(size_rows(G, a.streams, a.device, budget, share))
            except Exception as exc:
                result["sizes"].append({"n": sizes[i], "error": f"{type(exc).__name__}: {exc}"[:500]})
    finally:
        result["seconds"] = round(a.budget - budget.left(), 2)
        text = json.dumps(result, indent=1)
        if a.json:
            Path(a.json).write_text(text + "\n")
        print(text)
    return result


if __name__ == "__main__":
    main()
