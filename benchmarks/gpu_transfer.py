"""Cold `--device cuda` transfers of a bench-shaped pair (full size by default), with the default
dispatch and with torch-only backends in the same run: wall time, peak device memory, the
engine's own timings and the backends that ran, and how far the two outputs are apart.

    python -m benchmarks.gpu_transfer --family sdxl|flux [--depth 1.0] [--dir DIR] [--json FILE]

The models are generated on the GPU (synthetic.write_model(device="cuda")) and reused from DIR.
Run by benchmarks/gpu_check.sh. On a machine without a GPU, --device cpu --width 0.25 --depth 0.1
runs the same steps on the CPU (the check of this script itself).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import prolora
from prolora.bench import BenchConfig, prepare
from prolora.formats import read_lora

TORCH_ONLY = {"truncated_svd": "gram", "project_lora": "torch", "small_svd": "torch"}


def _merged(path: Path) -> dict[str, torch.Tensor]:
    lf = read_lora(path)
    return {k: (m.up.double().flatten(1) @ m.down.double().flatten(1)) * m.scale for k, m in lf.modules.items()}


def _run(paths: dict, device: str, backends: dict[str, str], out: Path, max_gpu_memory: str) -> dict:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = prolora.transfer(paths["source"], paths["target"], paths["loras"][0], out, device=device, cache=False,
                           backends=backends, max_memory="64GB", max_gpu_memory=max_gpu_memory if cuda else None,
                           overwrite=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    eng = res.report.info["engine"]
    return {"backends_forced": backends, "seconds": round(seconds, 3), "layers": eng["modules"],
            "chunks": eng["chunks"], "engine_seconds": eng["seconds"], "backends": eng["backends"],
            "peak_device_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
            "transferred": res.report.summary()["transferred"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sdxl", choices=("sdxl", "flux"))
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--depth", type=float, default=1.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-gpu-memory", default="16GB")
    ap.add_argument("--dir", default="/tmp/prolora-gpu-transfer")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    cfg = BenchConfig(family=a.family, width=a.width, depth=a.depth, folder=Path(a.dir), loras=1,
                      dtype=torch.bfloat16 if a.family == "flux" else torch.float16,
                      device=a.device if a.device.startswith("cuda") else None)
    t0 = time.perf_counter()
    paths = prepare(cfg)
    made = time.perf_counter() - t0
    outs = {name: Path(a.dir) / f"{a.family}-{name}.safetensors" for name in ("default", "torch-only")}
    rows = {"default": _run(paths, a.device, {}, outs["default"], a.max_gpu_memory),
            "torch-only": _run(paths, a.device, TORCH_ONLY, outs["torch-only"], a.max_gpu_memory)}
    got, ref = _merged(outs["default"]), _merged(outs["torch-only"])
    errs = [float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)) for k in ref if k in got]
    result = {"family": a.family, "width": a.width, "depth": a.depth, "device": a.device,
              "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
              "models_seconds": round(made, 1), "lora_layers": len(paths["modules"]), "runs": rows,
              "default_vs_torch_only": {"same_keys": got.keys() == ref.keys(),
                                        "max_rel_error_merged_dw": max(errs, default=None)}}
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
