"""`prolora bench --job extract`: rank-r extraction against what sd-scripts does (a full
torch.linalg.svd of every layer's dense difference), on one synthetic base/tuned pair, in one run.

The pair: a synthetic base model (prolora.synthetic, single file, float16 or bfloat16) and a
tuned copy whose UNet / transformer weights differ by dW = U diag(s) V^T with a decaying spectrum
s_i = (1 + i / 8)^-1 + 0.03 (a power-law head over a flat floor, as fine-tune differences have;
scaled to 5% of ||W||_F), U and V random orthonormal. Every other tensor is copied.

Each phase runs in its own process so that its peak RSS is its own:
- extract: the library call of `prolora extract BASE TUNED --rank r --max-memory M` (auto backend),
  timed around the call, `repeats` times (median reported: the machine is shared and noisy).
- reference: per layer, load both weights, form the float32 difference, full torch.linalg.svd,
  build the rank-r factors (timed: sd-scripts' loop); then, untimed, the optimal rank-r error
  sqrt(sum_{i>r} S_i^2) and the error of the LoRA the extract phase wrote, from its file.
The result: both times and peak RSS, the speed-up, and per layer the error ratio (extract's error
over the optimal one): the acceptance asks max ratio <= 1.01, speed-up >= 10x, peak RSS < 2 GB.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

DECAY_KNEE = 8.0
FLOOR = 0.03
SIZE = 0.05


@dataclass
class ExtractBenchConfig:
    """What the extract bench generates and runs (width/depth < 1 shrink the model, honestly
    reported in the result)."""

    family: str = ""  # a bench preset of a family record (Family.bench); "" for the default one
    width: float = 1.0
    depth: float = 1.0
    folder: Path = Path("prolora-bench")
    rank: int = 64
    max_memory: str = "2GB"
    skip_reference: bool = False
    repeats: int = 3  # extract runs; the median is compared (the reference, 5-10x longer, runs once)
    layers: str | None = None
    threads: int | None = None  # torch threads in each phase's process (None: torch's default)
    extra: dict = field(default_factory=dict)


def _say(msg: str) -> None:
    print(f"[bench extract] {msg}", file=sys.stderr, flush=True)


def spectrum(d: int) -> torch.Tensor:
    """The difference's singular values (before scaling): power-law head over a flat floor."""
    i = torch.arange(d, dtype=torch.float64)
    return 1.0 / (1.0 + i / DECAY_KNEE) + FLOOR


class _Orthonormal:
    """Random orthonormal (dim, d) matrices, cheap: one QR per (dim, d), then per layer a random
    row permutation and random row signs (both keep the columns orthonormal)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, dim: int, d: int) -> torch.Tensor:
        Q = self.cache.get((dim, d))
        if Q is None:
            Q = self.cache[(dim, d)] = torch.linalg.qr(torch.randn(dim, d, generator=self.g)).Q
        perm = torch.randperm(dim, generator=self.g)
        signs = torch.randint(0, 2, (dim, 1), generator=self.g).float() * 2 - 1
        return Q[perm] * signs


def write_tuned(base_path: Path, out: Path, seed: int = 7, layers: str | None = None) -> int:
    """A tuned copy of the single-file `base_path`: each UNet/transformer linear or 1x1-conv
    weight plus a decaying-spectrum difference; returns how many weights were changed."""
    import re

    from ..families import open_model
    from ..safetensors_io import SafetensorsFile, StreamingWriter

    pattern = re.compile(layers) if layers else None
    with open_model(base_path) as base:
        targets: dict[str, list] = {}
        for module, ref in base.weights.items():
            if module.partition(".")[0] not in ("unet", "transformer") or ref.pieces or ref.transposed:
                continue
            if len(ref.shape) == 4 and tuple(ref.shape[2:]) != (1, 1):
                continue
            if pattern is not None and not pattern.search(module):
                continue
            targets.setdefault(ref.key, []).append(ref)  # several for a fused weight (row slices)
        orth = _Orthonormal(seed)
        with SafetensorsFile(base_path) as f:
            entries = []
            for name in f.keys():
                info = f.info(name)
                entries.append((name, _dtype(info.dtype), info.shape))
            with StreamingWriter(out, entries, {**f.metadata, "prolora.bench": "extract tuned copy"}) as w:
                for name, dtype, shape in entries:
                    t = f.get(name)
                    refs = targets.get(name)
                    if refs:
                        full = t.float().reshape(shape[0], -1)
                        for ref in refs:  # each logical slice (Flux q, k, v, mlp) its own difference
                            a, b = ref.rows or (0, shape[0])
                            W = full[a:b]
                            m, n = W.shape
                            d = min(m, n)
                            s = spectrum(d).float()
                            dW = (orth(m, d) * s) @ orth(n, d).T
                            dW *= SIZE * W.norm() / dW.norm()
                            full[a:b] = W + dW
                        t = full.reshape(shape).to(dtype)
                    w.write(name, t.contiguous())
        return sum(len(v) for v in targets.values())


def _dtype(name: str) -> torch.dtype:
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
            "I64": torch.int64, "I32": torch.int32}[name]


def prepare(cfg: ExtractBenchConfig) -> dict[str, Path]:
    """The base and tuned files (generated once into cfg.folder, reused)."""
    from .. import families
    from ..bench import bench_part, default_preset
    from ..synthetic import write_model

    cfg.family = cfg.family or default_preset()
    folder = Path(cfg.folder)
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{cfg.family}-w{cfg.width:g}-d{cfg.depth:g}"
    base, tuned = folder / f"extract-base-{tag}.safetensors", folder / f"extract-tuned-{tag}.safetensors"
    preset = next(f.bench[cfg.family] for f in families.families() if cfg.family in f.bench)
    dtype = getattr(torch, preset.dtype)
    if not base.exists():
        _say(f"writing {base}")
        # the bench preset's own model (a derived pair's target: Chroma for "chroma")
        model_cfg = bench_part(cfg.family).bench_pair(cfg.family, cfg.width, cfg.depth)[1]
        write_model(base, model_cfg, layout="single-file", dtype=dtype, seed=0)
    if not tuned.exists():
        _say(f"writing {tuned}")
        write_tuned(base, tuned, layers=cfg.layers)
    return {"base": base, "tuned": tuned, "lora": folder / f"extract-{tag}-r{cfg.rank}.safetensors",
            "report": folder / f"extract-{tag}-r{cfg.rank}.json"}


def _child(args: list[str], threads: int | None = None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-m", "prolora.jobs.bench", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench phase {args[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def phase_extract(base: str, tuned: str, lora: str, report: str, rank: int, max_memory: str) -> dict[str, Any]:
    """The shipped extract, timed, in this process."""
    from ..engine.memory import peak_rss
    from .extract import ExtractOptions, extract

    t0, c0 = time.perf_counter(), _cpu()
    res = extract(base, tuned, lora, ExtractOptions(rank=rank, max_memory=max_memory), report=report)
    secs, cpu = time.perf_counter() - t0, _cpu() - c0
    return {"seconds": secs, "cpu_seconds": cpu, "peak_rss": peak_rss(), "summary": res.summary()}


def _cpu() -> float:
    """CPU seconds of this process, all threads (user + system): less sensitive than wall time to
    other processes on a shared machine."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def phase_reference(base: str, tuned: str, lora: str, report: str, rank: int) -> dict[str, Any]:
    """sd-scripts' loop (full SVD of each dense difference), timed; then, untimed, each layer's
    optimal rank-r error and the extracted LoRA's actual error."""
    from ..families import open_model
    from ..engine.memory import peak_rss
    from ..formats import read_lora

    rep = json.loads(Path(report).read_text())
    layers = [x for x in rep["layers"] if x["status"] == "extracted"]
    lf = read_lora(lora)
    svd_seconds = cpu_seconds = 0.0
    rows = []
    with open_model(base) as b, open_model(tuned) as t:
        from ..formats.parts import canonical_modules

        canon = canonical_modules(lf.modules, b)  # fused modules (Flux qkv, linear1) cut into slices
        for x in layers:
            t0, c0 = time.perf_counter(), _cpu()
            D = t.load(x["module"], torch.float32) - b.load(x["module"], torch.float32)
            D = D.reshape(D.shape[0], -1)
            U, S, Vh = torch.linalg.svd(D, full_matrices=False)
            up, down = U[:, :rank] * S[:rank], Vh[:rank]
            svd_seconds += time.perf_counter() - t0
            cpu_seconds += _cpu() - c0
            del U, Vh, up, down
            S64 = S.double()
            total = float((S64 ** 2).sum())
            opt = math.sqrt(float((S64[rank:] ** 2).sum()))
            m = canon[x["module"]]
            A = m.scale * (m.up.double().reshape(m.up.shape[0], -1) @ m.down.double().reshape(m.down.shape[0], -1))
            err = float((D.double() - A).norm())
            rows.append({"module": x["module"], "shape": list(D.shape), "backend": x["backend"],
                         "optimal_rel_error": opt / math.sqrt(total), "rel_error": err / math.sqrt(total),
                         "ratio": err / opt if opt > 0 else 1.0,
                         "gap": float(S64[rank - 1] / S64[rank]) if S64.numel() > rank else None})
            del D, A
    return {"seconds": svd_seconds, "cpu_seconds": cpu_seconds, "peak_rss": peak_rss(), "layers": rows}


def run(cfg: ExtractBenchConfig) -> dict[str, Any]:
    paths = prepare(cfg)
    _say(f"extract rank {cfg.rank}, --max-memory {cfg.max_memory}, {cfg.repeats} runs (median; the machine is shared)")
    runs = []
    for _ in range(max(1, cfg.repeats)):
        runs.append(_child(["extract", str(paths["base"]), str(paths["tuned"]), str(paths["lora"]),
                            str(paths["report"]), str(cfg.rank), cfg.max_memory], cfg.threads))
        _say(f"extract: {runs[-1]['seconds']:.1f} s, peak RSS {runs[-1]['peak_rss'] / 2**30:.2f} GiB")
    ext = dict(sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2])
    ext["peak_rss"] = max(r["peak_rss"] for r in runs)
    out: dict[str, Any] = {
        "job": "extract", "family": cfg.family, "width": cfg.width, "depth": cfg.depth, "rank": cfg.rank,
        "max_memory": cfg.max_memory, "base_bytes": paths["base"].stat().st_size,
        "spectrum": f"s_i = 1/(1 + i/{DECAY_KNEE:g}) + {FLOOR:g}, ||dW|| = {SIZE:g} ||W||",
        "machine": {"cpus": os.cpu_count(), "torch_threads": cfg.threads or torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "extract": {"seconds": ext["seconds"], "runs_seconds": [r["seconds"] for r in runs],
                    "cpu_seconds": ext["cpu_seconds"], "peak_rss_gb": ext["peak_rss"] / 2**30,
                    "layers": ext["summary"]["extracted"], "backends": ext["summary"]["backends"]},
    }
    if not cfg.skip_reference:
        _say("reference: full SVD of every layer's dense difference")
        ref = _child(["reference", str(paths["base"]), str(paths["tuned"]), str(paths["lora"]), str(paths["report"]),
                      str(cfg.rank)], cfg.threads)
        ratios = [r["ratio"] for r in ref["layers"]]
        worst = max(ref["layers"], key=lambda r: r["ratio"])
        out["reference"] = {"seconds": ref["seconds"], "cpu_seconds": ref["cpu_seconds"], "peak_rss_gb": ref["peak_rss"] / 2**30,
                            "what": "per layer: float32 difference, full torch.linalg.svd, rank-r factors"}
        out["speedup"] = ref["seconds"] / ext["seconds"]
        out["speedup_cpu"] = ref["cpu_seconds"] / ext["cpu_seconds"]
        out["error_ratio"] = {"max": max(ratios), "mean": sum(ratios) / len(ratios), "worst_layer": worst["module"],
                              "layers_over_1.01": sum(1 for r in ratios if r > 1.01)}
        out["layers"] = ref["layers"]
        out["acceptance"] = {"speedup>=10": out["speedup"] >= 10, "max_ratio<=1.01": max(ratios) <= 1.01,
                             "peak_rss<2GB": ext["peak_rss"] < 2e9}
    return out


def table(res: dict[str, Any]) -> str:
    e = res["extract"]
    lines = [f"extract bench: {res['family']} width {res['width']:g} depth {res['depth']:g}, rank {res['rank']}, "
             f"{e['layers']} layers, {res['base_bytes'] / 1e9:.2f} GB per model",
             f"  prolora extract   {e['seconds']:9.1f} s   peak RSS {e['peak_rss_gb']:.2f} GiB   ({', '.join(e['backends'])})"]
    if "reference" in res:
        r = res["reference"]
        er = res["error_ratio"]
        lines.append(f"  full SVD per layer {r['seconds']:8.1f} s   peak RSS {r['peak_rss_gb']:.2f} GiB")
        lines.append(f"  speed-up {res['speedup']:.1f}x wall, {res['speedup_cpu']:.1f}x CPU time; error / optimal: max {er['max']:.4f} (mean {er['mean']:.4f}), "
                     f"{er['layers_over_1.01']} layers over 1.01")
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m prolora.jobs.bench")
    ap.add_argument("phase", choices=("extract", "reference"))
    ap.add_argument("base")
    ap.add_argument("tuned")
    ap.add_argument("lora")
    ap.add_argument("report")
    ap.add_argument("rank", type=int)
    ap.add_argument("max_memory", nargs="?", default="2GB")
    a = ap.parse_args(argv)
    if a.phase == "extract":
        res = phase_extract(a.base, a.tuned, a.lora, a.report, a.rank, a.max_memory)
    else:
        res = phase_reference(a.base, a.tuned, a.lora, a.report, a.rank)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
