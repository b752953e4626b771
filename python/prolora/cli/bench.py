"""`prolora bench`: the reference and the fast path measured side by side on synthetic models
(`--job transfer`, the default), or extract against per-layer full SVD (`--job extract`). The
`--family` choices are the bench presets the family records offer (Family.bench)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import families
from ..errors import OptionError
from ..options import DEFAULT_SUBSPACE
from .common import writing


def presets() -> dict:
    """Every family's bench presets (name -> families.record.BenchPreset): the family of the
    default preset first, then the others in registry order."""
    fams = sorted(families.families(), key=lambda f: not any(p.default for p in f.bench.values()))
    return {name: p for f in fams for name, p in f.bench.items()}


def register(sub) -> None:
    choices = presets()
    default = next(name for name, p in choices.items() if p.default)
    said = "; ".join(f"{name}: {p.help}" for name, p in choices.items() if p.help)
    b = sub.add_parser("bench", help="measure the reference and the fast path side by side on synthetic models")
    b.add_argument("--family", default=default, choices=tuple(choices),
                   help=f"model shape ({said}; default %(default)s)" if said else "model shape (default %(default)s)")
    b.add_argument("--width", type=float, default=1.0, help="channel scale (1.0: real layer shapes)")
    b.add_argument("--depth", type=float, default=1.0, help="transformer-block scale (1.0: every block)")
    b.add_argument("--dir", default="prolora-bench", help="where models, LoRAs and the cache go (reused)")
    b.add_argument("--loras", type=int, default=8, help="LoRAs in the warm-cache batch (default %(default)s)")
    b.add_argument("--rank", type=int, default=16)
    b.add_argument("--subspace", default=DEFAULT_SUBSPACE)
    b.add_argument("--max-memory", default="2GB")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--skip-reference", action="store_true", help="skip the slow full-SVD end-to-end run")
    b.add_argument("--no-cache", action="store_true",
                   help="cold run only, storing no bases (a full-size Flux pair's bases take tens of GB)")
    b.add_argument("--lora-width", type=int, default=0, metavar="D",
                   help="LoRA only on layers whose smaller side is D wide (e.g. 1280: their Gram matrix is 1280 x 1280)")
    b.add_argument("--lora-layers", type=int, default=0, metavar="N", help="LoRA only on the first N such layers")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    b.add_argument("--max-gpu-memory", default="16GB", metavar="SIZE", help="with --device cuda (default %(default)s)")
    b.add_argument("--dry-run", action="store_true",
                   help="with --device cuda: print the chunk plan and the device memory of each chunk of a cold "
                        "transfer at this size, from the layer shapes alone (no files, nothing computed)")
    b.add_argument("--job", choices=("transfer", "extract"), default="transfer",
                   help="what to measure: the transfer (default) or extract against per-layer full SVD")
    b.add_argument("--extract-rank", type=int, default=64, help="extract bench: rank (default %(default)s)")
    b.add_argument("--threads", type=int, metavar="N",
                   help="extract bench: torch threads in each timed phase (default: torch's own); 1 makes "
                        "the CPU-time ratio robust to other work on a shared machine")
    b.set_defaults(run=cmd_bench)


def cmd_bench(a: argparse.Namespace) -> int:
    if a.job == "extract":
        return cmd_bench_extract(a)
    import torch

    from ..bench import BenchConfig, run, table

    cfg = BenchConfig(family=a.family, width=a.width, depth=a.depth, folder=Path(a.dir), loras=a.loras, rank=a.rank,
                      subspace=a.subspace, max_memory=a.max_memory, repeats=a.repeats,
                      skip_reference=a.skip_reference, cache=not a.no_cache,
                      dtype=getattr(torch, presets()[a.family].dtype), lora_width=a.lora_width,
                      lora_layers=a.lora_layers)
    if a.dry_run:
        if not a.device.startswith("cuda"):
            raise OptionError("--dry-run plans a GPU run: add --device cuda")
        from ..bench import device_plan, plan_table
        from ..options import parse_size

        plan = device_plan(cfg, parse_size(a.max_gpu_memory))
        if a.json:
            with writing(a.json):
                Path(a.json).write_text(json.dumps(plan, indent=2) + "\n")
        print(plan_table(plan))
        return 0
    if a.device != "cpu":
        raise OptionError(f"bench --device {a.device}: only the --dry-run plan runs on a GPU from here; the GPU "
                          "measurements are benchmarks/gpu_check.sh")
    print(table(run(cfg, Path(a.json) if a.json else None)))
    return 0


def cmd_bench_extract(a: argparse.Namespace) -> int:
    from ..jobs.bench import ExtractBenchConfig, run, table

    cfg = ExtractBenchConfig(family=a.family, width=a.width, depth=a.depth, folder=Path(a.dir), rank=a.extract_rank,
                             max_memory=a.max_memory, skip_reference=a.skip_reference, repeats=a.repeats,
                             threads=a.threads)
    result = run(cfg)
    if a.json:
        from ..safetensors_io import atomic_path

        with atomic_path(a.json) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0
