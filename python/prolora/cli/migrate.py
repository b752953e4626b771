"""`prolora migrate`: many LoRAs moved on a Ray cluster (prolora.scaleout; needs prolora[ray])."""
from __future__ import annotations

import argparse
import sys

from ..lora import FORMATS
from ..ops.projection import METHODS
from ..options import DEFAULT_METHOD, DEFAULT_SUBSPACE, DEFAULT_TAU
from .common import overrides


def register(sub) -> None:
    m = sub.add_parser("migrate", help="move many LoRAs on a Ray cluster (many GPUs or machines; needs prolora[ray])")
    m.add_argument("source", metavar="SOURCE_BASE")
    m.add_argument("target", metavar="TARGET_BASE")
    m.add_argument("loras", metavar="LORA", nargs="*", help="LoRA .safetensors files")
    m.add_argument("--lora-dir", metavar="DIR", help="also every .safetensors LoRA in DIR")
    m.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="output folder (created if missing); holds prolora-manifest.json and the report")
    m.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="Ray cluster: an address (head:6379, ray://head:10001), auto (the running cluster; "
                        "the default of a bare --ray) or local (a new one here); without --ray: $RAY_ADDRESS, "
                        "else a running local cluster, else a new one")
    m.add_argument("--workers", type=int, metavar="N", help="worker actors (default: one per GPU with --device "
                   "cuda, else one per --cpus-per-worker CPUs of the cluster)")
    m.add_argument("--cpus-per-worker", type=float, default=1, metavar="C", help="(default %(default)s)")
    m.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="LoRAs per task, run in one pass over the layers (default %(default)s)")
    m.add_argument("--max-attempts", type=int, default=3, metavar="K",
                   help="tries of a LoRA whose worker crashes or raises (default %(default)s)")
    m.add_argument("--ship-cache", action="store_true",
                   help="send the bases to the workers through Ray's object store (no shared --cache-dir needed)")
    m.add_argument("--worker-cache-dir", metavar="DIR", help="where workers keep shipped bases (default: theirs)")
    m.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="(default %(default)s)")
    m.add_argument("--rank", default="same", help="output rank: same, 2r or N (default %(default)s)")
    m.add_argument("--format", choices=("same",) + FORMATS, default="same", help="output format (default: as the input)")
    m.add_argument("--alpha", choices=("keep", "rank"), default="keep")
    m.add_argument("--skipped", choices=("drop", "copy"), default="drop")
    m.add_argument("--match", choices=("auto", "name", "similarity"), default="auto")
    m.add_argument("--subspace", default=DEFAULT_SUBSPACE, metavar="MODE", help="(default %(default)s)")
    m.add_argument("--tau", type=float, default=DEFAULT_TAU, help="(default %(default)s)")
    m.add_argument("--device", default="cpu", help="the workers' device: cpu or cuda (default %(default)s)")
    m.add_argument("--backend", default=None, metavar="SPEC")
    m.add_argument("--max-memory", metavar="SIZE", help="host memory budget per worker, e.g. 8GB")
    m.add_argument("--max-gpu-memory", metavar="SIZE")
    m.add_argument("--cache-dir", metavar="DIR", help="basis cache built on the driver; without --ship-cache every "
                   "node must see it at this path (default $PROLORA_CACHE_DIR or ~/.cache/prolora)")
    m.add_argument("--report", metavar="FILE", help="final JSON report (default OUTDIR/prolora-migrate-report.json)")
    m.add_argument("--overwrite", action="store_true", help="replace outputs in OUTDIR the manifest does not know")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    m.set_defaults(run=cmd_migrate)


def cmd_migrate(a: argparse.Namespace) -> int:
    from ..scaleout import migrate, require_ray

    require_ray()  # first: without Ray, one line that says how to get it, and nothing touched
    import torch

    from ..api import lora_files
    from ..options import TransferOptions

    loras = list(a.loras) + (lora_files(a.lora_dir) if a.lora_dir else [])
    here = a.device if a.device.startswith("cuda") and torch.cuda.is_available() else "cpu"  # the driver's
    opts = TransferOptions(method=a.method, rank=a.rank, format=a.format, alpha=a.alpha, skipped=a.skipped,
                           match=a.match, subspace=a.subspace, tau=a.tau, device=here, backends=overrides(a.backend),
                           max_memory=a.max_memory, max_gpu_memory=a.max_gpu_memory, cache_dir=a.cache_dir)
    res = migrate(a.source, a.target, loras, a.output, opts, address=a.ray, workers=a.workers,
                  cpus_per_worker=a.cpus_per_worker, device=a.device, batch_size=a.batch_size,
                  max_attempts=a.max_attempts, ship_cache=a.ship_cache, worker_cache_dir=a.worker_cache_dir,
                  overwrite=a.overwrite, report=a.report, progress=not a.quiet)
    s = res.report["summary"]
    for error in sorted(res.failed.values()):
        print(f"FAILED {error}", file=sys.stderr)
    for w in res.report["warnings"]:
        print(f"prolora: warning: {w}", file=sys.stderr)
    print(f"{s['written']} written, {s['skipped']} already done, {s['failed']} failed; {s['workers']} workers, "
          f"{s['loras_per_minute']:.1f} LoRAs/min; bases {s['seconds']['cache']:.1f} s, "
          f"transfer {s['seconds']['transfer']:.1f} s")
    print(f"manifest {res.manifest}\nreport {res.report_path}")
    return 2 if res.failed else 0
