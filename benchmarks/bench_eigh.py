"""The truncated eigensolver (topk_eigh) and the Gram basis, measured against the per-layer float32
full SVD in the same run (ratios, not absolute times: the machine is shared).

On one 1280-wide SDXL transformer block (q, k, v, out of both attentions, the two feed-forward
linears: 10 layers of shapes 1280x1280, 1280x2048, 10240x1280, 1280x5120; source and target,
synthetic with trained-like spectra, fp16 as stored), per round, every candidate in turn:

  bases, all 20 weights of the block:
    svd           torch.linalg.svd per weight, float32, all threads, one at a time (what tools do)
    gram-before   the fast basis as it was: one GEMM Gram, eigh on all threads, one at a time
    gram          the default now: blocked syrk Gram, topk_eigh, recovery; two layers at a time on
                  one thread each (ops/host.py)
  eigensolver alone, on the 20 Gram matrices (two at a time on one thread each unless said):
    eigh (all threads, one at a time), eigh, eigvalsh (the tridiagonal floor), lapack (subset),
    subspace (warm-started from the source basis for the target; fallbacks counted)
  Gram alone: one GEMM, blocked syrk with 2/4/8 blocks, scipy's BLAS ssyrk (where installed)

and the subspace accuracy of each eigensolver against float64 (1 - phi of the top-k subspace).
Median over --rounds; ratios are against `svd` (bases), `eigh (all threads)` (eigensolver) and
the GEMM (Gram) of the same round.

    python -m benchmarks.bench_eigh [--rounds 3] [--json FILE] [--device cpu|cuda]

On a GPU (--device cuda, run by gpu_check.sh) the candidates are timed with CUDA synchronisation:
eigh in one batched call, per matrix, per matrix on 4 CUDA streams (one host thread each), on the
host's cores, split between the GPU and the host; the subspace solver; and both together as a
transfer runs them (the sources by eigh, for their spectrum, the targets by the subspace solver
warm-started from them). --points FILE writes the GPU rows in the form the winners step of
gpu_check.sh reads (op topk_eigh, baseline eigh), so the first GPU run decides the GPU default.
--width scales the shapes (0.1 for a quick check of the script).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from prolora.method import KMode
from prolora.ops import topk_eigh, truncated_svd
from prolora.ops.gram import gram_matrix
from prolora.ops.host import host_map, host_threads
from prolora.synthetic import generator, spectral_weight
from prolora.synthetic.values import Perturbation, perturb

BLOCK = [(1280, 1280)] * 6 + [(1280, 2048)] * 2 + [(10240, 1280), (1280, 5120)]
MODE = KMode.parse("energy:0.9")


def weights(device: str, width: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, full in enumerate(BLOCK):
        shape = tuple(max(8, round(x * width)) for x in full)
        Ws = spectral_weight(shape, generator("bench_eigh", i, str(shape)))
        Wt = perturb(Ws, f"bench_eigh.{i}", Perturbation())
        out.append((Ws.half().to(device), Wt.half().to(device)))
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def chooser(d: int):
    return lambda S, e: MODE.choose(d, S, e)


def grams(pairs, device: str) -> list[torch.Tensor]:
    out = []
    for W in (w for p in pairs for w in p):
        A = W.float().T if W.shape[0] <= W.shape[1] else W.float()
        out.append(A.T @ A)
    return out


def run(rounds: int, device: str, width: float = 1.0) -> dict:
    pairs = weights(device, width)
    Gs = grams(pairs, device)
    d = Gs[0].shape[0]
    ref = [topk_eigh.backends["reference"].fn(G, chooser(d)) for G in Gs]
    ks = [e.k for e in ref]
    warm = [None if i % 2 == 0 else ref[i - 1].vectors.float() for i in range(len(Gs))]  # target: the source's
    cpu = device == "cpu"
    gram_fn = truncated_svd.backends["gram"].fn
    W_all = [w for p in pairs for w in p]

    def seq(fn, items):
        return lambda: [fn(x) for x in items]

    def pooled(fn, items):
        return (lambda: host_map(fn, items)) if cpu else seq(fn, items)

    def eig_with(name):
        be = topk_eigh.backends[name]
        return lambda i: be.fn(Gs[i], ks[i], warm=[warm[i]])

    idx = list(range(len(Gs)))
    cands = {
        "bases": {
            "svd": seq(lambda W: torch.linalg.svd(W.float(), full_matrices=False), W_all),
            "gram-before": seq(lambda W: _gram_before(W, chooser(min(W.shape))), W_all),
            "gram": pooled(lambda W: gram_fn(W, chooser(min(W.shape))), W_all),
        },
        "eigensolver": {
            "eigh (all threads, one at a time)": seq(lambda G: torch.linalg.eigh(G), Gs),
            "eigh": pooled(lambda G: torch.linalg.eigh(G), Gs),
            "eigvalsh (tridiagonal floor)": pooled(lambda G: torch.linalg.eigvalsh(G), Gs),
            "subspace": pooled(eig_with("subspace"), idx),
        },
        "gram": {  # as the engine runs them: two layers at a time, one thread each
            "gemm": pooled(lambda W: _gram_gemm(W), W_all),
            **{f"syrk {nb} blocks": pooled(lambda W, nb=nb: gram_matrix(_operand(W), nb), W_all) for nb in (2, 4, 8)},
        },
    }
    if not cpu:
        cands["eigensolver"].update(device_candidates(Gs, eig_with))
    if topk_eigh.backends["lapack"].available() is None and cpu:
        cands["eigensolver"]["lapack (subset)"] = pooled(eig_with("lapack"), idx)
        cands["gram"]["scipy ssyrk"] = pooled(_scipy_syrk, W_all)
    times: dict[str, dict[str, list[float]]] = {g: {n: [] for n in c} for g, c in cands.items()}
    for _ in range(rounds):
        for g, c in cands.items():
            for name, fn in c.items():
                times[g][name].append(_time(fn, device))
    base = {"bases": "svd", "eigensolver": "eigh (all threads, one at a time)", "gram": "gemm"}
    out: dict = {"device": device, "threads": host_threads(), "rounds": rounds, "layers": len(BLOCK),
                 "matrices": len(Gs), "d": d, "k": ks, "groups": {}}
    for g, c in times.items():
        rows = {}
        for name, ts in c.items():
            # ratio per round (same round, same load), then the median
            ratios = [b / t for b, t in zip(times[g][base[g]], ts)]
            rows[name] = {"median_s": statistics.median(ts), "speedup_vs_" + base[g]: statistics.median(ratios)}
        out["groups"][g] = rows
    out["accuracy"] = accuracy(Gs, ks, ref, warm)
    return out


def device_candidates(Gs: list[torch.Tensor], eig_with) -> dict:
    """GPU ways to run the eigensolver over a chunk's Gram matrices (sources at even, targets at
    odd indices)."""
    import threading

    host = [G.cpu() for G in Gs]
    src, tgt = list(range(0, len(Gs), 2)), list(range(1, len(Gs), 2))
    streams = [torch.cuda.Stream() for _ in range(4)]

    def on_streams():
        def work(j):
            with torch.cuda.stream(streams[j]):
                for i in range(j, len(Gs), len(streams)):
                    torch.linalg.eigh(Gs[i])
            streams[j].synchronize()
        ts = [threading.Thread(target=work, args=(j,)) for j in range(len(streams))]
        [t.start() for t in ts]
        [t.join() for t in ts]

    def split(share: float = 1 / 3):
        cut = round(len(Gs) * (1 - share))
        t = threading.Thread(target=lambda: host_map(torch.linalg.eigh, host[cut:]))
        t.start()
        torch.linalg.eigh(torch.stack(Gs[:cut]))
        torch.cuda.synchronize()
        t.join()

    return {
        "eigh (one batched call)": lambda: torch.linalg.eigh(torch.stack(Gs)),
        "eigh on 4 CUDA streams": on_streams,
        "eigh on the host's cores": lambda: host_map(torch.linalg.eigh, host),
        "eigh split: 2/3 GPU + 1/3 host cores": split,
        "sources eigh + targets subspace (a transfer's pair)": lambda: (
            torch.linalg.eigh(torch.stack([Gs[i] for i in src])), [eig_with("subspace")(i) for i in tgt]),
    }


def points(res: dict) -> dict:
    """The GPU rows as pytest-benchmark-like records for bench_kernels.py's winners step: op
    topk_eigh, each candidate backend against its baseline eigh, `accurate` from the accuracy run."""
    rows = []
    acc = res["accuracy"]
    eig = res["groups"]["eigensolver"]
    base = eig.get("eigh (one batched call)") or eig["eigh"]
    for backend, name in (("eigh", None), ("subspace", "subspace")):
        t = base["median_s"] if name is None else eig[name]["median_s"]
        ok = name is None or acc.get(name, {}).get("worst_1_minus_phi", 1.0) <= max(
            1e-6, 2 * acc.get("eigh", {}).get("worst_1_minus_phi", 0.0))
        rows.append({"group": f"topk_eigh {res['d']}x{res['d']} b={res['matrices']}", "stats": {"median": t},
                     "extra_info": {"device": "cuda", "op": "topk_eigh", "backend": backend, "dtype": "float32",
                                    "shape": [res["d"], res["d"]], "batch": res["matrices"], "accurate": ok}})
    return {"benchmarks": rows}


def _operand(W: torch.Tensor) -> torch.Tensor:
    W = W.float()
    return W.T if W.shape[0] <= W.shape[1] else W


def _gram_gemm(W: torch.Tensor) -> torch.Tensor:
    A = _operand(W)
    return A.T @ A


def _gram_before(W: torch.Tensor, k):
    """The fast basis before topk_eigh: one GEMM, eigh on all threads, recovery."""
    A = _operand(W)
    G = A.T @ A
    evals, evecs = torch.linalg.eigh(G)
    S = evals.flip(0).clamp_min(0).sqrt()
    kk = k(S, float(G.diagonal().double().sum()))
    Q = evecs[:, -kk:].flip(-1)
    return A @ Q / S[:kk]


def _scipy_syrk(W: torch.Tensor):
    from scipy.linalg import blas

    A = _operand(W)
    return blas.ssyrk(1.0, A.T.contiguous().numpy())  # C = a A' A' ^T with A' = A^T: the d x d Gram


def accuracy(Gs, ks, ref, warm) -> dict:
    out: dict = {}
    names = [n for n in ("eigh", "lapack", "subspace") if topk_eigh.backends[n].available() is None]
    for name in names:
        be = topk_eigh.backends[name]
        worst, solvers = 0.0, {}
        for i, G in enumerate(Gs):
            if Gs[0].is_cuda and name == "lapack":
                continue
            e = be.fn(G, ks[i], warm=[warm[i]])
            R = ref[i].vectors
            worst = max(worst, abs(1 - float(((R.T @ e.vectors.double().to(R.device)) ** 2).sum()) / ks[i]))
            key = "fallback" if e.fell_back else e.solver
            solvers[key] = solvers.get(key, 0) + 1
        out[name] = {"worst_1_minus_phi": worst, "solvers": solvers}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=float, default=1.0, help="scale the block's shapes (1.0: SDXL's)")
    ap.add_argument("--json")
    ap.add_argument("--points", help="GPU rows for the winners table (gpu_check.sh)")
    a = ap.parse_args()
    res = run(a.rounds, a.device, a.width)
    for g, rows in res["groups"].items():
        print(f"{g}:")
        for name, r in rows.items():
            ratio = next(v for k, v in r.items() if k.startswith("speedup"))
            print(f"  {name:<45} {r['median_s']:8.3f} s   {ratio:6.2f}x")
    print("accuracy (1 - phi vs float64, worst of the matrices):",
          {n: f"{v['worst_1_minus_phi']:.1e} {v['solvers']}" for n, v in res["accuracy"].items()})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.points and a.device.startswith("cuda"):
        with open(a.points, "w") as f:
            json.dump(points(res), f, indent=1)


if __name__ == "__main__":
    main()
