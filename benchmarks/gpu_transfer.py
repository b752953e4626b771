"""Steps (d) and (e) of benchmarks/gpu_check.sh: cold `--device cuda` transfers of a bench-shaped
pair, each run's figures written to the JSON the moment it ends (a step cut short keeps what it
finished).

Runs, in this order (most valuable first; `--runs` picks):
  cache       cold, the basis cache on (the CLI default; a fresh cache folder), default dispatch
  torch-only  cold, no cache, every op forced onto its torch backend
  winners     cold, no cache, default dispatch with the measured-winners table (--winners) in
              force; skipped, saying so, when the table has no win on this GPU (it would time
              torch-only again)
Per run: seconds, peak device memory, peak RSS, the engine's own timings and chunks, the backends
that ran, and the host synchronizations the compute path made (torch's sync debug mode).
Outputs are compared with the torch-only one through r x r products only (no m x n matrix is
formed): ||dW_a - dW_b||_F / ||dW_b||_F per layer, dW = scale * up @ down.

    python -m benchmarks.gpu_transfer --family sdxl|flux [--depth 1.0] [--dir DIR] [--json FILE]
        [--runs cache,torch-only,winners] [--winners gpu_winners.json] [--remove GLOB ...]
        [--min-free-gb 20]

The models are generated on the GPU (synthetic.write_model(device="cuda")) and reused from DIR.
--remove deletes earlier files (the SDXL pair before Flux) and --min-free-gb checks the disk
first. On a machine without a GPU, --device cpu with small --width/--depth runs the same steps
on the CPU (the check of this script itself).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

TORCH_ONLY = {"truncated_svd": "gram", "project_lora": "torch", "small_svd": "torch", "subspace_phi": "torch"}


def lowrank_gap(a, b) -> tuple[float, float]:
    """(||dW_a - dW_b||_F^2, ||dW_b||_F^2) for LoRA modules a, b (dW = scale * up @ down) from
    r x r products only: ||U D||^2 = tr((U^T U)(D D^T)), cross terms likewise."""
    def parts(m):
        r = m.up.shape[1]
        return m.up.reshape(m.up.shape[0], r).double() * m.scale, m.down.reshape(r, -1).double()
    (Ua, Da), (Ub, Db) = parts(a), parts(b)

    def inner(U1, D1, U2, D2):  # <U1 D1, U2 D2>_F = tr((U1^T U2)(D2 D1^T))
        return float(((U1.T @ U2) * (D1 @ D2.T)).sum())
    bb = inner(Ub, Db, Ub, Db)
    return max(inner(Ua, Da, Ua, Da) - 2 * inner(Ua, Da, Ub, Db) + bb, 0.0), bb


def compare(path_a: Path, path_b: Path) -> dict:
    """How far output a is from output b, through r x r products per layer."""
    from prolora.formats import read_lora

    a, b = read_lora(path_a).modules, read_lora(path_b).modules
    num = den = worst = 0.0
    for k, mb in b.items():
        if k in a:
            d2, n2 = lowrank_gap(a[k], mb)
            num, den = num + d2, den + n2
            worst = max(worst, (d2 / n2) ** 0.5 if n2 > 0 else 0.0)
    return {"same_keys": a.keys() == b.keys(), "layers": len(b), "rel_error_merged_dw": (num / den) ** 0.5 if den else 0.0,
            "worst_layer_rel_error": worst}


def _winners_in_force(path: str | None, device: str) -> tuple[bool, str]:
    """Whether the table has an accurate win on this GPU (else the winners run would be torch's)."""
    if not path or not Path(path).is_file():
        return False, f"no winners table ({path or 'none given'})"
    from prolora.ops.measured import parse

    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    wins = [p for p in parse(json.loads(Path(path).read_text())) if p.wins and p.device == name]
    if not wins:
        return False, f"the table has no accurate win over torch on {name}: the default is torch-only"
    return True, f"{len(wins)} winning points on {name}"


def _run(paths: dict, device: str, out: Path, *, cache_dir: Path | None, backends: dict, max_gpu_memory: str,
         max_memory: str) -> dict:
    import prolora
    from prolora.engine.memory import peak_rss

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    syncs = 0
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            res = prolora.transfer(paths["source"], paths["target"], paths["loras"][0], out, device=device,
                                   cache=cache_dir is not None, cache_dir=str(cache_dir) if cache_dir else None,
                                   backends=backends, max_memory=max_memory,
                                   max_gpu_memory=max_gpu_memory if cuda else None, overwrite=True)
            if cuda:
                torch.cuda.synchronize()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    seconds = time.perf_counter() - t0
    syncs = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    eng = res.report.info["engine"]
    return {"seconds": round(seconds, 3), "layers": eng["modules"], "chunks": eng["chunks"],
            "basis_batches": eng.get("basis_batches"), "engine_seconds": eng["seconds"], "backends": eng["backends"],
            "bytes_read": eng["bytes_read"], "cache_hits": eng["cache_hits"],
            "peak_device_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
            "peak_rss_gib": round(peak_rss() / 2**30, 3), "host_syncs_all_threads": syncs if cuda else None,
            "transferred": res.report.summary()["transferred"]}


def _free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sdxl", choices=("sdxl", "flux"))
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--depth", type=float, default=1.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-gpu-memory", default="16GB")
    ap.add_argument("--max-memory", default="16GB", help="host budget of the transfers")
    ap.add_argument("--dir", default="/tmp/prolora-gpu-transfer")
    ap.add_argument("--runs", default="cache,torch-only,winners")
    ap.add_argument("--winners", metavar="FILE", help="the measured-winners table of this GPU (step c)")
    ap.add_argument("--remove", nargs="*", default=[], metavar="GLOB", help="delete these first (disk)")
    ap.add_argument("--min-free-gb", type=float, default=0.0)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    folder = Path(a.dir)
    folder.mkdir(parents=True, exist_ok=True)
    result: dict = {"family": a.family, "width": a.width, "depth": a.depth, "device": a.device,
                    "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
                    "runs": {}, "compare_to_torch_only": {}}

    def save() -> None:
        text = json.dumps(result, indent=2)
        if a.json:
            tmp = Path(a.json + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, a.json)

    removed = [p for pattern in a.remove for p in glob.glob(pattern)]
    for p in removed:
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    result["removed"] = removed
    result["free_gb_before"] = round(_free_gb(folder), 1)
    save()
    if result["free_gb_before"] < a.min_free_gb:
        result["error"] = f"{result['free_gb_before']} GB free < {a.min_free_gb} GB: not generating the pair"
        save()
        raise SystemExit(result["error"])
    from prolora.bench import BenchConfig, prepare

    cfg = BenchConfig(family=a.family, width=a.width, depth=a.depth, folder=folder, loras=1,
                      dtype=torch.bfloat16 if a.family == "flux" else torch.float16,
                      device=a.device if a.device.startswith("cuda") else None)
    t0 = time.perf_counter()
    paths = prepare(cfg)
    result["models_seconds"] = round(time.perf_counter() - t0, 1)
    result["lora_layers"] = len(paths["modules"])
    result["model_gb"] = round(sum(Path(paths[k]).stat().st_size for k in ("source", "target")) / 1e9, 2)
    result["free_gb_after_models"] = round(_free_gb(folder), 1)
    save()
    outs = {}
    common = dict(max_gpu_memory=a.max_gpu_memory, max_memory=a.max_memory)
    for name in [r for r in a.runs.split(",") if r]:
        out = folder / f"{a.family}-{name}.safetensors"
        if name == "cache":
            cache_dir = folder / f"cache-{a.family}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            if a.winners:
                os.environ["PROLORA_WINNERS"] = a.winners
            row = _run(paths, a.device, out, cache_dir=cache_dir, backends={}, **common)
            row["cache_gb"] = round(sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file()) / 1e9, 2)
            shutil.rmtree(cache_dir, ignore_errors=True)  # the disk is needed for the next pair
        elif name == "torch-only":
            row = _run(paths, a.device, out, cache_dir=None, backends=dict(TORCH_ONLY), **common)
        elif name == "winners":
            ok, why = _winners_in_force(a.winners, a.device)
            if not ok:
                result["runs"][name] = {"skipped": why}
                save()
                continue
            os.environ["PROLORA_WINNERS"] = a.winners
            row = _run(paths, a.device, out, cache_dir=None, backends={}, **common)
            row["winners"] = why
        else:
            raise SystemExit(f"unknown run {name!r}")
        outs[name] = out
        result["runs"][name] = row
        if "torch-only" in outs:
            for other, path in outs.items():
                if other != "torch-only":
                    result["compare_to_torch_only"][other] = compare(path, outs["torch-only"])
        save()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
