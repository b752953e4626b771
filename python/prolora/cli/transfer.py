"""`prolora transfer`: move LoRAs from one base to another (one, a batch, or one per expert), with
the optional `--refine*` flags."""
from __future__ import annotations

import argparse
import sys

from ..lora import FORMATS
from ..ops.projection import METHODS
from ..options import DEFAULT_METHOD
from . import refine
from .common import add_common, options, progress_factory


def register(sub) -> None:
    t = sub.add_parser("transfer", help="move LoRAs from SOURCE_BASE to TARGET_BASE")
    t.add_argument("source", metavar="SOURCE_BASE", help="diffusers folder or .safetensors checkpoint the LoRA was trained on")
    t.add_argument("target", metavar="TARGET_BASE", help="diffusers folder or .safetensors checkpoint to move it to")
    t.add_argument("loras", metavar="LORA", nargs="*",
                   help="LoRA .safetensors files (kohya, diffusers/PEFT, old diffusers, ComfyUI; LoRA, LoCon, LoHa, "
                        "LoKr, full differences, DoRA)")
    t.add_argument("--lora-dir", metavar="DIR", help="also every .safetensors LoRA in DIR")
    t.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output .safetensors file, or a folder (required for several LoRAs; created if missing)")
    t.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="(default %(default)s)")
    t.add_argument("--rank", default="same", help="output rank: same (input rank), 2r (exact), or N (default %(default)s)")
    t.add_argument("--convert-error", type=float, default=0.01, metavar="F",
                   help="LoKr, LoHa, full-difference and DoRA modules are written as the LoRA of the smallest rank "
                        "within this relative error of their dW (--rank N wins) (default %(default)s)")
    t.add_argument("--format", choices=("same",) + FORMATS, default="same", help="output format (default: as the input)")
    t.add_argument("--alpha", choices=("keep", "rank"), default="keep",
                   help="keep the input's alpha/r convention, or write alpha = rank (default %(default)s)")
    t.add_argument("--skipped", choices=("drop", "copy"), default="drop",
                   help="layers below tau: drop their adapter or copy it unchanged (default %(default)s)")
    t.add_argument("--match", choices=("auto", "name", "similarity"), default="auto",
                   help="layer matching: by name, by subspace similarity (targets with fewer blocks, e.g. "
                        "SSD-1B), or auto: similarity where depths differ (default %(default)s)")
    t.add_argument("--widths", choices=("refuse", "lstsq"), default="refuse",
                   help="a target weight of another shape: skip it, or map the LoRA by LoRA-X's least-squares "
                        "map, refused where the subspaces disagree on the shared channels (default %(default)s)")
    t.add_argument("--target-2", metavar="TARGET_2", default=None,
                   help="a second expert (Wan 2.2 A14B split files: TARGET_BASE the high-noise, TARGET_2 the "
                        "low-noise expert): one output per expert, OUT.high_noise / OUT.low_noise.safetensors "
                        "(a Wan 2.2 folder with transformer/ and transformer_2/ does this by itself)")
    t.add_argument("--report", metavar="FILE", help="write the per-layer report(s) as JSON")
    t.add_argument("--plot", metavar="FILE.png", help="write a per-block heatmap of phi and of what was transferred")
    t.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never an input)")
    add_common(t)
    refine.add_refine_arguments(t, default_steps=0)
    t.set_defaults(run=cmd_transfer)


def cmd_transfer(a: argparse.Namespace) -> int:
    from ..api import TransferResult, transfer_files

    opts = options(a, method=a.method, rank=a.rank, format=a.format, alpha=a.alpha, skipped=a.skipped,
                   match=a.match, widths=a.widths, refine=refine.refine_options(a),
                   convert_error=a.convert_error)
    progress = progress_factory(a.quiet)

    def say(r) -> None:  # each LoRA of a batch as it completes
        if isinstance(r, TransferResult):
            s = r.report.summary()
            line, err = f"ok     {r.output}  ({s['transferred']}/{s['layers']} layers)", False
        else:
            line, err = f"FAILED {r.error}", True
        if progress:
            progress.write(line, file=sys.stderr if err else None)
        else:
            print(line, file=sys.stderr if err else sys.stdout)

    try:
        res = transfer_files(a.source, a.target, a.loras, a.output, opts, lora_dir=a.lora_dir, report=a.report,
                             plot=a.plot, overwrite=a.overwrite, progress=progress, on_result=say,
                             target_2=a.target_2)
    finally:
        if progress:
            progress.close()
    if not isinstance(res, TransferResult) and hasattr(res, "targets"):  # experts.ExpertsResult
        return _experts(a, res)
    if isinstance(res, TransferResult):
        if not a.quiet:
            print(res.report.table())
            for m in res.report.info.get("matching", []):
                if m["source_block"] is None:
                    print(f"unmatched {m['attention']} block {m['target_block']}: no source block for it")
                else:
                    print(f"matched {m['attention']} block {m['target_block']} <- source block {m['source_block']} "
                          f"(mean phi {m['score']:.3f})")
        if "refine" in res.report.info and not a.quiet:
            print("\n".join(refine.report_lines(res.report.info["refine"])))
        for w in res.report.warnings:
            print(f"prolora: warning: {w}", file=sys.stderr)
        print(f"wrote {res.output}")
        return 0
    s = res.stats
    passes = f" in {s.passes} passes" if s.passes > 1 else ""
    print(f"{len(res.results)} written, {len(res.failures)} failed; {s.modules} layers in {s.chunks} chunks{passes}, "
          f"{s.seconds.get('total', 0):.1f} s, peak RSS {s.peak_rss / 2**30:.2f} GiB")
    return 2 if res.failures else 0


def _experts(a: argparse.Namespace, res) -> int:
    """One section per expert (a target holding several, e.g. Wan 2.2 A14B)."""
    from ..api import TransferResult

    failed = 0
    for label, r in res.results.items():
        print(f"== {label.replace('_', '-')} expert: {res.targets[label]}")
        if not isinstance(r, TransferResult):  # a batch: each LoRA was said as it completed
            failed += len(r.failures)
            print(f"{len(r.results)} written, {len(r.failures)} failed")
            continue
        if not a.quiet:
            print(r.report.table())
        for w in r.report.warnings:
            print(f"prolora: warning: {label}: {w}", file=sys.stderr)
        print(f"wrote {r.output}")
    return 2 if failed else 0
