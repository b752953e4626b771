"""Cost of `--refine` (issue 18): seconds per LoRA and peak memory, SDXL-shaped and Flux-shaped
synthetic pairs at a small latent size and reduced depth (CPU).

As a script, one configuration per process (so the peak RSS is that configuration's):

    python benchmarks/bench_refine.py --family sdxl --width 0.25 --depth 0.2 --steps 10 --batch 2 --resolution 16
    python benchmarks/bench_refine.py --family flux --blocks 2,4 --steps 10 --batch 2 --resolution 16

prints one JSON row: the models' size, the whole refinement's wall and CPU seconds (what
`--refine STEPS` adds to a transfer: building the two denoisers, encoding the contexts, the
held-out error before and after, the steps, each also on its own), the training loop's seconds per
step, the conditioning and its encoders, whether the refined factors were kept, and the process's
peak RSS. `--layout single-file` writes the pair as single files (SD: LDM/SGM with the CLIP
encoders embedded, as users have them) from the same seed as the folders: the same weights, so the
same prompts and seed give the same result as `--layout diffusers`. `--cond` is `--refine-cond`
(default: the library's own, prompts through the models' encoders).
Under pytest (`python -m pytest benchmarks/bench_refine.py --benchmark-enable`) it times a tiny
SDXL-shaped refinement of a few steps.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import prolora
from prolora.families import open_model
from prolora.formats import read_lora
from prolora.refine import RefineOptions, refine_lora
from prolora.synthetic import PRESETS, flux_config, shrink, write_lora, write_pair


def _pair(folder: Path, family: str, width: float, depth: float, blocks: tuple[int, int], dtype: torch.dtype,
          layout: str = "diffusers"):
    if family == "flux":
        cfg = flux_config("flux-dev", "small", blocks=blocks)
    else:
        cfg = shrink(PRESETS[family], width, depth)
    ext = ".safetensors" if layout == "single-file" else ""
    src, tgt = write_pair(folder / f"src{ext}", folder / f"tgt{ext}", cfg, dtype=dtype)
    lora = write_lora(src, folder / "lora.safetensors", format="kohya", rank=16, targets="transformer")
    return src, tgt, lora


def measure(family: str = "sdxl", width: float = 0.25, depth: float = 0.2, blocks: tuple[int, int] = (2, 4),
            steps: int = 10, batch: int = 2, resolution: int = 16, tokens: int | None = 77,
            dtype: torch.dtype = torch.float32, device: str = "cpu", layout: str = "diffusers", cond: str | None = "random",
            holdout: int | None = None) -> dict:
    """One refinement after a prolora-full transfer; the figures as a dict."""
    with tempfile.TemporaryDirectory(prefix="bench-refine-") as tmp:
        d = Path(tmp)
        src, tgt, lora = _pair(d, family, width, depth, blocks, dtype, layout)
        transferred = prolora.transfer(src, tgt, lora, cache=False).lora
        opts = RefineOptions(steps=steps, batch=batch, resolution=resolution, tokens=tokens, cond=cond,
                             holdout=holdout or batch)
        with open_model(src) as s, open_model(tgt) as t:
            params = sum(r.numel for m, r in s.weights.items() if m.startswith(("unet.", "transformer.")))
            t0, c0 = time.perf_counter(), time.process_time()
            _, stats = refine_lora(s, t, read_lora(lora), transferred, opts, device)
            total, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"family": family, "width": width, "depth": depth, "blocks": list(blocks) if family == "flux" else None,
            "dtype": str(dtype).removeprefix("torch."), "lora_weights_adapted": len(transferred.modules),
            "denoiser_weights_millions": round(params / 1e6, 2), "steps": steps, "batch": batch,
            "resolution": resolution, "tokens": tokens, "refine_seconds": round(total, 2),
            "refine_cpu_seconds": round(cpu, 2),
            "train_seconds": stats.seconds, "seconds_per_step": round(stats.seconds / max(steps, 1), 3),
            "error_before": round(stats.error_before, 4), "error_after": round(stats.error_after, 4),
            "kept": stats.kept, "layout": layout, "cond": stats.settings.get("cond"), "timings": stats.timings,
            "conditioning": stats.conditioning, "holdout": opts.holdout,
            "peak_rss_gib": round(rss, 2), "threads": torch.get_num_threads(), "device": device}


def test_refine_tiny_sdxl(benchmark):
    benchmark.group = "refine sdxl tiny"
    row = benchmark.pedantic(measure, kwargs=dict(width=0.05, depth=0.1, steps=3, batch=1, resolution=8, tokens=8),
                             rounds=1)
    assert row["steps"] == 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=("sdxl", "sd15", "flux"), default="sdxl")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--depth", type=float, default=0.2)
    p.add_argument("--blocks", default="2,4", help="Flux double,single blocks (default %(default)s)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--tokens", type=int, default=None, help="--refine-tokens (default: the library's)")
    p.add_argument("--cond", default=None, help="--refine-cond (default: the library's: prompts through the encoders)")
    p.add_argument("--layout", choices=("diffusers", "single-file"), default="diffusers")
    p.add_argument("--holdout", type=int, default=None, help="held-out inputs (default: the batch)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="append the row to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    row = measure(a.family, a.width, a.depth, tuple(int(x) for x in a.blocks.split(",")), a.steps, a.batch,
                  a.resolution, a.tokens, getattr(torch, a.dtype), a.device, a.layout, a.cond, a.holdout)
    line = json.dumps(row)
    print(line)
    if a.json:
        with open(a.json, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
