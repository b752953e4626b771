"""`prolora bench`: the reference path and the fast path measured side by side in one run.

Builds (or reuses) a synthetic source/target pair in a real layout with real layer shapes and a
LoRA on every transformer-block linear, then measures:
- per layer shape: full SVD (what existing tools do) vs the fast basis vs the bare Gram GEMM
  (the floor), with the basis' principal-angle similarity to the float64 exact subspace;
- end to end, each in its own process (so peak RSS is its own): the reference path (full SVD
  per layer), the fast path with a cold cache, and warm-cache batches of 1 and N LoRAs;
- the accuracy of the fast path's merged dW against the float64 reference on sampled layers.
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import families
from .bench_cost import children_cpu as _children_cpu, phase_line
from .errors import OptionError
from .families import open_model
from .formats import read_lora, write_lora
from .lora import LoraFile, LoraModule
from .method import KMode
from .ops import phi, truncated_svd
from .ops.host import host_map, host_threads
from .safetensors_io import atomic_path

@dataclass
class BenchConfig:
    family: str = ""  # a bench preset of a family record (Family.bench); "" for the default one
    width: float = 1.0  # channel scale (1.0: real layer shapes)
    depth: float = 1.0  # transformer-block scale (1.0: every block)
    folder: Path = Path("prolora-bench")
    loras: int = 8  # LoRAs in the warm-cache batch (two stacks of the grouped projection)
    rank: int = 16
    subspace: str = "energy:0.9"
    max_memory: str = "2GB"
    repeats: int = 3  # per-shape timings: median of this many
    accuracy_layers: int = 12
    skip_reference: bool = False
    cache: bool = True  # False: the cold run writes no cache and the warm runs are skipped
    dtype: torch.dtype = torch.float16
    device: str | None = None  # where the synthetic models' values are drawn (cuda: full size in seconds)
    lora_width: int = 0  # only LoRA layers whose smaller side (the Gram matrix) is this wide (0: any)
    lora_layers: int = 0  # only the first N of those, in model order (0: all)


@dataclass
class BenchResult:
    config: dict[str, Any]
    machine: dict[str, Any]
    shapes: list[dict[str, Any]] = field(default_factory=list)
    end_to_end: list[dict[str, Any]] = field(default_factory=list)
    accuracy: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


# ----------------------------------------------------------------------------- inputs


def bench_part(name: str):
    """The synthetic part of the family that offers bench preset `name` (Family.bench); "" is the
    default preset. It gives bench_pair(name, width, depth) and BENCH_LORA (format, modules)."""
    for fam in families.families():
        if name in fam.bench or (not name and any(p.default for p in fam.bench.values())):
            return fam.part("synthetic")
    raise OptionError(f"no family offers the bench preset {name!r}; see `prolora bench --help`")


def default_preset() -> str:
    """The bench preset marked default in the family records."""
    return next(n for fam in families.families() for n, p in fam.bench.items() if p.default)


def prepare(cfg: BenchConfig) -> dict[str, Path]:
    """Source and target checkpoints (single-file) and the LoRAs; reused when already there."""
    from .synthetic import write_model

    cfg.family = cfg.family or default_preset()
    cfg.folder.mkdir(parents=True, exist_ok=True)
    tag = f"{cfg.family}-w{cfg.width:g}-d{cfg.depth:g}"
    write = write_model
    src, tgt = cfg.folder / f"{tag}-source.safetensors", cfg.folder / f"{tag}-target.safetensors"
    if not src.exists():
        _say(f"writing source model {src}")
        write(src, _model_config(cfg), layout="single-file", dtype=cfg.dtype, seed=0, device=cfg.device)
    if not tgt.exists():
        _say(f"writing target model {tgt}")
        write(tgt, _model_config(cfg, target=True), layout="single-file", dtype=cfg.dtype, seed=0, base=src,
              device=cfg.device)
    loras = []
    fmt, pattern = bench_part(cfg.family).BENCH_LORA
    with open_model(src) as m:
        modules = select_modules(m, cfg, pattern)
        sel = (f"-w{cfg.lora_width}" if cfg.lora_width else "") + (f"-n{cfg.lora_layers}" if cfg.lora_layers else "")
        for i in range(max(cfg.loras, 1)):
            p = cfg.folder / f"{tag}-lora{i}-r{cfg.rank}{sel}.safetensors"
            if not p.exists():
                _write_lora(m, modules, p, cfg.rank, seed=i, fmt=fmt)
            loras.append(p)
    return {"source": src, "target": tgt, "loras": loras, "modules": modules}


def select_modules(model, cfg: BenchConfig, pattern: re.Pattern) -> list[str]:
    """The bench's LoRA layers: every module of the family's pattern (its BENCH_LORA), or
    (--lora-width, --lora-layers) the first N of those whose smaller side is that wide."""
    modules = [name for name in model.weights if pattern.match(name)]
    if cfg.lora_width:
        modules = [n for n in modules if min(model.weights[n].shape[0], math.prod(model.weights[n].shape[1:]))
                   == cfg.lora_width]
    return modules[:cfg.lora_layers] if cfg.lora_layers else modules


def _write_lora(model, modules: list[str], path: Path, rank: int, seed: int, fmt: str) -> None:
    """A LoRA on `modules` whose deltas are ~5% of the weights (alpha = rank / 2), in the format
    the family's trainers write (its synthetic part's BENCH_LORA: kohya for UNet models, PEFT with
    split q/k/v for the transformer families)."""
    g = torch.Generator().manual_seed(seed)
    spelling = "peft" if fmt == "peft" else model.kohya_spelling
    mods = {}
    fused: dict[str, list[str]] = {}  # a key that adapts several modules (slices of one fused weight)
    for name in modules:
        hit = model.spell_fused(name, spelling)
        if hit is not None:
            fused.setdefault(hit[0], []).append(name)
            mods.setdefault(hit[0], None)
            continue
        out, inp = model.weights[name].shape[:2]
        key = model.spell(name, spelling)
        down = torch.randn(rank, inp, generator=g) / math.sqrt(inp)
        up = torch.randn(out, rank, generator=g) * (0.1 / math.sqrt(rank))
        mods[key] = LoraModule(key, down.half(), up.half(), rank / 2)
    for key, names in fused.items():  # one down; up rows on each slice's rows (zero elsewhere)
        total = model.spell_fused(names[0], spelling)[1]
        inp = model.weights[names[0]].shape[1]
        down = torch.randn(rank, inp, generator=g) / math.sqrt(inp)
        up = torch.zeros(total, rank)
        for name in names:
            for a, b in model.spell_fused(name, spelling)[2]:
                up[a:b] = torch.randn(b - a, rank, generator=g) * (0.1 / math.sqrt(rank))
        mods[key] = LoraModule(key, down.half(), up.half(), rank / 2)
    write_lora(path, LoraFile(fmt, mods, {"ss_network_dim": str(rank)}, torch.float16), fmt)


# ----------------------------------------------------------------------------- per shape


def shape_rows(paths: dict, cfg: BenchConfig) -> list[dict[str, Any]]:
    """For one layer of each distinct shape: full SVD vs fast basis vs Gram floor, and accuracy."""
    mode = KMode.parse(cfg.subspace)
    ref, fast = truncated_svd.backends["reference"].fn, truncated_svd.backends["gram"].fn
    threads = host_threads()
    rows = []
    with open_model(paths["source"]) as m:
        seen: dict[tuple, str] = {}
        for name in paths["modules"]:
            seen.setdefault(tuple(m.weights[name].shape), name)
        count = {s: sum(1 for n in paths["modules"] if tuple(m.weights[n].shape) == s) for s in seen}
        for shape, name in seen.items():
            W = m.load(name, dtype=None).reshape(shape[0], -1)
            d = min(W.shape)
            chooser = lambda S, e: mode.choose(d, S, e)  # noqa: E731
            exact = ref(W, chooser)  # float64
            W32 = W.float()
            t_svd = _median_time(lambda: torch.linalg.svd(W32, full_matrices=False), cfg.repeats)
            # as the engine runs it on a CPU: two layers at a time, one thread each (per matrix)
            t_fast = _median_time(lambda: host_map(lambda X: fast(X, chooser), [W] * threads), cfg.repeats) / threads
            t_seq = _median_time(lambda: fast(W, chooser), cfg.repeats)  # one matrix on every thread
            t_floor = _median_time(lambda: (W32 @ W32.T) if W.shape[0] <= W.shape[1] else (W32.T @ W32), cfg.repeats)
            b = fast(W, exact.k)
            rows.append({
                "shape": list(shape), "layers": count[shape], "k": exact.k, "gap": exact.gap(),
                "s1_over_s_d4": float(exact.S[0] / exact.S[d // 4]),
                "full_svd_s": t_svd, "fast_s": t_fast, "fast_one_at_a_time_s": t_seq, "gram_floor_s": t_floor,
                "speedup": t_svd / t_fast, "fast_over_floor": t_fast / t_floor,
                "phi_left_vs_f64": phi(exact.U, b.U.double()), "phi_right_vs_f64": phi(exact.V, b.V.double()),
            })
            _say(f"shape {shape}: full SVD {t_svd:.3f}s, fast {t_fast:.3f}s, floor {t_floor:.4f}s")
    return rows


# ----------------------------------------------------------------------------- end to end


def _cli(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run `prolora transfer ... --report R` in a fresh process; return its report and wall time."""
    report = Path(env["PROLORA_BENCH_REPORT"])
    load = os.getloadavg()[0]  # other work on a shared machine skews every timing: recorded with it
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "prolora.cli", "transfer", *args, "--report", str(report), "-q",
                           "--overwrite"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"bench run failed: {proc.stderr.strip().splitlines()[-1:]}")
    data = json.loads(report.read_text())
    return {"wall_s": wall, "cpu_s": cpu, "data": data, "loadavg": [load, os.getloadavg()[0]]}


def _engine(data: dict[str, Any]) -> dict[str, Any]:
    if "engine" in data:  # batch report
        return data["engine"]
    return data["info"]["engine"]


def end_to_end(paths: dict, cfg: BenchConfig) -> list[dict[str, Any]]:
    cache = cfg.folder / "cache"
    out = cfg.folder / "out"
    out.mkdir(exist_ok=True)
    env = dict(os.environ, PROLORA_CACHE_DIR=str(cache), PROLORA_BENCH_REPORT=str(cfg.folder / "report.json"))
    src, tgt, loras = str(paths["source"]), str(paths["target"]), [str(p) for p in paths["loras"]]
    common = ["--subspace", cfg.subspace, "--max-memory", cfg.max_memory]
    n_layers = len(paths["modules"])
    runs = []

    def row(name: str, res: dict[str, Any], n_loras: int) -> dict[str, Any]:
        eng = _engine(res["data"])
        secs = eng["seconds"].get("total", res["wall_s"])
        r = {"run": name, "loras": n_loras, "layers": n_layers, "seconds": secs, "wall_s": res["wall_s"],
             "layers_per_s": n_layers / secs if secs else None,
             "gb_read_per_s": eng["bytes_read"] / secs / 1e9 if secs else None, "bytes_read": eng["bytes_read"],
             "peak_rss_gb": eng["peak_rss"] / 2**30, "chunks": eng["chunks"], "backends": eng["backends"],
             "cache_hits": eng["cache_hits"], "parts_s": eng["seconds"], "basis_phases_thread_s": eng.get("basis_phases"),
             "solvers": eng.get("solvers"), "fallbacks": eng.get("fallbacks"), "loadavg_1min": res["loadavg"],
             "cpu_s": res["cpu_s"]}
        _say(f"{name}: {secs:.1f}s, peak RSS {r['peak_rss_gb']:.2f} GiB; {phase_line(r)}")
        return r

    if not cfg.skip_reference:
        runs.append(row("reference (full SVD per layer, fp32)", _cli(
            [src, tgt, loras[0], "-o", str(out / "ref.safetensors"), "--no-cache", "--backend", "truncated_svd=svd",
             *common], env), 1))
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    if not cfg.cache:  # a full-size model's bases can outgrow the disk: the same cold run, nothing stored
        runs.append(row("fast, cold, no cache written", _cli([src, tgt, loras[0], "-o", str(out / "fast.safetensors"),
                                                             "--no-cache", *common], env), 1))
        return runs
    runs.append(row("fast, cold cache", _cli([src, tgt, loras[0], "-o", str(out / "fast.safetensors"), *common], env), 1))
    (out / "warm1").mkdir(exist_ok=True)
    runs.append(row("fast, warm cache, 1 LoRA", _cli([src, tgt, loras[0], "-o", str(out / "warm1"), *common], env), 1))
    if len(loras) > 1:
        runs.append(row(f"fast, warm cache, {len(loras)} LoRAs", _cli([src, tgt, *loras, "-o", str(out / "warmN"),
                                                                          *common], env), len(loras)))
    return runs


def accuracy(paths: dict, cfg: BenchConfig) -> dict[str, Any]:
    """Merged dW of the fast path vs the float64 reference, on a sample of layers."""
    from .api import transfer

    lf = read_lora(paths["loras"][0])
    rng = random.Random(0)
    keys = sorted(lf.modules)
    # every layer of a --lora-layers selection, else a sample
    sample = keys if cfg.lora_layers else rng.sample(keys, min(cfg.accuracy_layers, len(keys)))
    small = LoraFile(lf.format, {k: lf.modules[k] for k in sample}, dict(lf.metadata), lf.dtype)
    common = dict(subspace=cfg.subspace, cache=False)
    fast = transfer(paths["source"], paths["target"], small, **common)
    ref = transfer(paths["source"], paths["target"], small, backends={"*": "reference"}, **common)

    def dw(m: LoraModule) -> torch.Tensor:
        return m.scale * m.up.double().reshape(m.up.shape[0], m.rank) @ m.down.double().reshape(m.rank, -1)

    num = den = 0.0
    worst = 0.0
    for k, m in ref.lora.modules.items():
        a, b = dw(fast.lora.modules[k]), dw(m)
        num += float((a - b).norm() ** 2)
        den += float(b.norm() ** 2)
        worst = max(worst, float((a - b).norm() / b.norm()))
    same_decisions = all(x.transferred == y.transferred for x, y in zip(fast.report.layers, ref.report.layers))
    return {"layers": len(sample), "rel_error_merged_dw": math.sqrt(num / den) if den else 0.0,
            "worst_layer_rel_error": worst, "same_gate_decisions": same_decisions,
            "note": "merged dW = scale * up @ down as written (fp16 factors) vs float64 reference transfer"}


# ----------------------------------------------------------------------------- device plan (dry run)


def _lora_pattern(cfg: BenchConfig) -> re.Pattern:
    """Which of the source's modules the bench's LoRAs adapt (the family part's BENCH_LORA)."""
    return bench_part(cfg.family).BENCH_LORA[1]


def _model_config(cfg: BenchConfig, target: bool = False):
    """The synthetic model configuration a bench of `cfg` builds (real layer shapes at width 1):
    the source's, or with `target` the target's (another member only for a derived pair such as
    FLUX.1-schnell -> Chroma), from the family part's bench_pair."""
    return bench_part(cfg.family).bench_pair(cfg.family or default_preset(), cfg.width, cfg.depth)[int(target)]


def device_plan(cfg: BenchConfig, max_gpu_memory: int) -> dict[str, Any]:
    """The chunk plan of a cold `--device cuda` transfer of the bench's LoRA layers, from the
    model's layer shapes alone (no file, no number computed): per chunk, its modules and the
    device bytes the planner budgets for them (both weights in their stored dtype and in
    float32, Gram matrix and eigensolver workspace, both bases), plus the LoRAs' factors. The
    planner keeps each chunk within --max-gpu-memory / 1.5 (the next chunk's weights are in
    flight); the fake-CUDA tests (tests/engine/test_fake_cuda.py) run the real engine on small shapes and
    check that the live device bytes stay within --max-gpu-memory."""
    from .engine.planner import chunk_limit, chunk_modules, module_bytes
    from .options import parse_size
    from .synthetic import model_params

    pattern = _lora_pattern(cfg)
    model_cfg = _model_config(cfg)
    part = bench_part(cfg.family)
    if hasattr(part, "module_shapes"):  # canonical ids that are not parameters (slices of fused weights)
        shapes = part.module_shapes(model_cfg)
    else:
        components = model_params(model_cfg)
        shapes = {f"{comp}.{name[:-len('.weight')]}": shape for comp, params in components.items()
                  for name, shape in params if name.endswith(".weight")}
    modules = [m for m in shapes if pattern.match(m)]
    itemsize = torch.finfo(cfg.dtype).bits // 8
    need = {m: module_bytes(shapes[m], itemsize, 2) + cfg.loras * cfg.rank * sum(shapes[m][:2]) * 4
            for m in modules}
    limit = chunk_limit(parse_size(cfg.max_memory), 0, max_gpu_memory)
    chunks = chunk_modules(modules, need, limit)
    rows = [{"chunk": i, "modules": len(c), "first": c[0], "last": c[-1], "device_bytes": sum(need[m] for m in c)}
            for i, c in enumerate(chunks)]
    return {"family": cfg.family, "width": cfg.width, "depth": cfg.depth, "layers": len(modules),
            "max_memory": parse_size(cfg.max_memory), "max_gpu_memory": max_gpu_memory, "chunk_limit": int(limit),
            "chunks": rows, "peak_device_bytes": max((r["device_bytes"] for r in rows), default=0)}


def plan_table(plan: dict[str, Any]) -> str:
    gib = 2**30
    lines = [f"device plan (dry run, nothing computed): {plan['family']} width {plan['width']} depth {plan['depth']}, "
             f"{plan['layers']} LoRA layers, --max-memory {plan['max_memory'] / gib:.1f} GiB, --max-gpu-memory "
             f"{plan['max_gpu_memory'] / gib:.1f} GiB (a chunk may take {plan['chunk_limit'] / gib:.2f} GiB)",
             f"{'chunk':>5} {'modules':>7} {'device GiB':>10}  first .. last module"]
    for r in plan["chunks"]:
        lines.append(f"{r['chunk']:>5} {r['modules']:>7} {r['device_bytes'] / gib:>10.3f}  {r['first']} .. {r['last']}")
    lines.append(f"{len(plan['chunks'])} chunks; peak planned device memory {plan['peak_device_bytes'] / gib:.2f} GiB "
                 f"of {plan['max_gpu_memory'] / gib:.1f} GiB")
    return "\n".join(lines)


def run(cfg: BenchConfig, json_path: Path | None = None) -> BenchResult:
    res = BenchResult(
        config={k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in cfg.__dict__.items()},
        machine={"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                 "platform": platform.platform(), "processor": platform.processor()},
    )
    paths = prepare(cfg)
    res.config["layers"] = len(paths["modules"])
    res.shapes = shape_rows(paths, cfg)
    res.end_to_end = end_to_end(paths, cfg)
    res.accuracy = accuracy(paths, cfg)
    res.targets = targets(res)
    if json_path is not None:
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(res.__dict__, indent=2, default=str) + "\n")
    return res


def targets(res: BenchResult) -> dict[str, Any]:
    """The issue's targets, computed from this run's own figures."""
    e = {r["run"]: r for r in res.end_to_end}
    ref = next((r for n, r in e.items() if n.startswith("reference")), None)
    cold = next((r for n, r in e.items() if n.startswith("fast, cold")), None)
    floor = sum(r["gram_floor_s"] * r["layers"] for r in res.shapes) * 2  # both models
    out: dict[str, Any] = {"gram_floor_s": floor}
    if cold:
        out["cold_over_floor"] = cold["seconds"] / floor if floor else None
        out["peak_rss_gb_max"] = max(r["peak_rss_gb"] for r in res.end_to_end)
    if ref and cold:
        out["cold_speedup_vs_reference"] = ref["seconds"] / cold["seconds"]
        out["cold_cpu_speedup_vs_reference"] = ref["cpu_s"] / cold["cpu_s"] if cold.get("cpu_s") else None
    warm = [r for r in res.end_to_end if r["run"].startswith("fast, warm")]
    if len(warm) == 2 and warm[1]["loras"] > 1:
        out["warm_seconds_per_additional_lora"] = (warm[1]["seconds"] - warm[0]["seconds"]) / (warm[1]["loras"] - 1)
    return out


def table(res: BenchResult) -> str:
    lines = [f"prolora bench: {res.config['family']} width {res.config['width']} depth {res.config['depth']}, "
             f"{res.config.get('layers')} LoRA layers, {res.machine['cpu_count']} CPUs, torch {res.machine['torch']}",
             "", "per layer shape (median of repeats; one layer each):",
             f"{'shape':>12} {'layers':>6} {'k':>5} {'full SVD s':>10} {'fast s':>8} {'floor s':>8} {'speedup':>8} "
             f"{'fast/floor':>10} {'phi_L':>9} {'phi_R':>9} {'gap':>8}"]
    for r in res.shapes:
        lines.append(f"{'x'.join(map(str, r['shape'])):>12} {r['layers']:>6} {r['k']:>5} {r['full_svd_s']:>10.3f} "
                     f"{r['fast_s']:>8.3f} {r['gram_floor_s']:>8.4f} {r['speedup']:>8.2f} {r['fast_over_floor']:>10.2f} "
                     f"{r['phi_left_vs_f64']:>9.6f} {r['phi_right_vs_f64']:>9.6f} {(r['gap'] or 0):>8.5f}")
    lines += ["", "end to end (each run in its own process):",
              f"{'run':<40} {'LoRAs':>5} {'seconds':>8} {'layers/s':>9} {'GB/s read':>9} {'peak RSS GiB':>12} {'chunks':>6}"]
    for r in res.end_to_end:
        lines.append(f"{r['run']:<40} {r['loras']:>5} {r['seconds']:>8.1f} {r['layers_per_s']:>9.1f} "
                     f"{r['gb_read_per_s']:>9.3f} {r['peak_rss_gb']:>12.2f} {r['chunks']:>6}")
    lines += ["", "cost per phase (read and cache write run in background threads):"]
    lines += [f"  {r['run']}: {phase_line(r)}" for r in res.end_to_end]
    a = res.accuracy
    lines += ["", f"accuracy: merged dW of the fast path vs float64 reference on {a['layers']} sampled layers: "
              f"rel. Frobenius error {a['rel_error_merged_dw']:.2e} (worst layer {a['worst_layer_rel_error']:.2e}), "
              f"same gate decisions: {a['same_gate_decisions']}"]
    t = res.targets
    lines.append("targets: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items()))
    return "\n".join(lines)
