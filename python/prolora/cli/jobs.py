"""`extract`, `resize` and `merge`: parse, call the library (prolora.jobs), print. Errors are the
library's ProloraErrors, which main prints as one line with exit status 2."""
from __future__ import annotations

import argparse
import sys

from ..errors import OptionError
from ..lora import FORMATS
from .common import progress_factory, say


def register(sub) -> None:
    r = sub.add_parser("resize", help="change a LoRA's rank (fixed or sd-scripts' dynamic rules), on its factors")
    r.add_argument("lora", metavar="LORA")
    r.add_argument("-o", "--output", required=True, metavar="OUT")
    r.add_argument("--rank", type=int, metavar="N", help="new rank (with --dynamic: the largest rank allowed)")
    r.add_argument("--dynamic", metavar="RULE",
                   help="sv_ratio:F (keep S >= max(S)/F), sv_fro:F (smallest rank keeping fraction F of "
                        "||dW||_F) or sv_cumulative:F (smallest rank keeping fraction F of sum(S))")
    r.add_argument("--report", metavar="FILE", help="per-module report as JSON")
    r.add_argument("-q", "--quiet", action="store_true", help="no per-module table")
    r.set_defaults(run=cmd_resize)

    m = sub.add_parser("merge", help="weighted sum of LoRAs, recompressed to a rank through the factors")
    m.add_argument("loras", metavar="LORA", nargs="+")
    m.add_argument("-o", "--output", required=True, metavar="OUT")
    m.add_argument("--ratios", metavar="W1,W2,...", help="one weight per LoRA (default 1 each)")
    m.add_argument("--rank", type=int, metavar="N", help="output rank (default: the summed rank, exact)")
    m.add_argument("--base", metavar="MODEL", help="match modules through this base model (LoRAs in different formats)")
    m.add_argument("--format", choices=FORMATS, help="output format (default: the first LoRA's; needs --base to change)")
    m.add_argument("--report", metavar="FILE", help="per-module report as JSON")
    m.add_argument("--into", metavar="BASE", help="write a merged checkpoint: BASE (a single .safetensors file) "
                                                  "plus the weighted sum, to -o")
    m.add_argument("-q", "--quiet", action="store_true")
    m.set_defaults(run=cmd_merge)

    e = sub.add_parser("extract", help="a LoRA of TUNED - BASE: the best rank-r (or energy-chosen) approximation per layer")
    e.add_argument("base", metavar="BASE", help="the base checkpoint (diffusers folder or .safetensors)")
    e.add_argument("tuned", metavar="TUNED", nargs="?", help="the fine-tuned checkpoint")
    e.add_argument("--tuned-dir", metavar="DIR", help="every checkpoint in DIR against BASE (one read of BASE)")
    e.add_argument("-o", "--output", required=True, metavar="OUT", help="output LoRA (a folder with --tuned-dir)")
    e.add_argument("--rank", type=int, metavar="N", help="rank of every linear / 1x1-conv layer")
    e.add_argument("--energy", type=float, metavar="F",
                   help="instead of --rank: the smallest rank keeping fraction F of each layer's ||dW||_F^2")
    e.add_argument("--conv-rank", type=int, metavar="N", help="also extract 3x3 convs, at this rank (default: skipped)")
    e.add_argument("--clamp-quantile", type=float, metavar="Q",
                   help="clamp the factors' values at the Q quantile of their absolute values (sd-scripts: 0.99; "
                        "default: no clamping, the exact best approximation)")
    e.add_argument("--min-diff", type=float, default=0.0, metavar="D",
                   help="skip layers whose largest |W_tuned - W_base| is below D (default %(default)s: only identical ones)")
    e.add_argument("--layers", metavar="REGEX", help="only layers whose canonical name matches (re.search)")
    e.add_argument("--text-encoders", action="store_true", help="also the text encoders (default: the UNet / transformer)")
    e.add_argument("--format", choices=FORMATS, default="kohya", help="output format (default %(default)s)")
    e.add_argument("--save-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    e.add_argument("--backend", choices=("auto", "randomized", "exact"), default="auto",
                   help="truncated SVD: auto (randomized where the rank is small, else exact), or force one")
    e.add_argument("--max-memory", metavar="SIZE", help="host memory budget for weights in flight, e.g. 2GB")
    e.add_argument("--report", metavar="FILE", help="per-layer report as JSON")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    e.set_defaults(run=cmd_extract)


def cmd_resize(a: argparse.Namespace) -> int:
    from ..jobs.factors import RankRule
    from ..jobs.resize import resize

    if a.dynamic is None and a.rank is None:
        raise OptionError("resize needs --rank N or --dynamic sv_ratio:F|sv_fro:F|sv_cumulative:F")
    rule = RankRule.parse(a.dynamic, a.rank) if a.dynamic else RankRule("rank", float(a.rank))
    res = resize(a.lora, a.output, rule, report=a.report)
    say(a.quiet, res.table())
    print(f"wrote {res.output}")
    return 0


def _ratios(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"--ratios {text!r}: expected comma-separated numbers, e.g. 0.7,0.3") from None


def cmd_merge(a: argparse.Namespace) -> int:
    from ..jobs.merge import merge, merge_into

    if a.into:
        if a.base or a.format or a.report:
            raise OptionError("--into matches modules through BASE itself and writes a checkpoint: drop --base/--format/--report")
        done = merge_into(a.loras, a.into, a.output, _ratios(a.ratios), rank=a.rank)
        print(f"wrote {done.output}: {len(done.changed)} weights changed")
        return 0
    res = merge(a.loras, a.output, _ratios(a.ratios), rank=a.rank, base=a.base, format=a.format, report=a.report)
    s = res.summary()
    if not a.quiet:
        for module, why in res.skipped.items():
            print(f"skipped {module}: {why}", file=sys.stderr)
    print(f"wrote {res.output}: {s['modules']} modules, rank <= {s['rank_max']}, mean retained energy "
          f"{s['mean_retained_energy']:.4f}")
    return 0


def cmd_extract(a: argparse.Namespace) -> int:
    import torch

    from ..jobs.extract import ExtractOptions, extract, extract_many

    if (a.tuned is None) == (a.tuned_dir is None):
        raise OptionError("extract needs TUNED or --tuned-dir DIR (one of them)")
    opts = ExtractOptions(rank=a.rank, energy=a.energy, conv_rank=a.conv_rank, clamp_quantile=a.clamp_quantile,
                          min_diff=a.min_diff, layers=a.layers, text_encoders=a.text_encoders, format=a.format,
                          save_dtype=getattr(torch, a.save_dtype), backend=a.backend, max_memory=a.max_memory)
    progress = progress_factory(a.quiet)
    try:
        if a.tuned is not None:
            results = [extract(a.base, a.tuned, a.output, opts, progress=progress, report=a.report)]
            failed: dict[str, str] = {}
        else:
            batch = extract_many(a.base, a.tuned_dir, a.output, opts, progress=progress, report=a.report)
            results, failed = batch.results, batch.failed
    finally:
        if progress is not None:
            progress.close()
    for r in results:
        s = r.summary()
        print(f"wrote {r.output}: {s['extracted']} layers (rank {s['rank_min']}..{s['rank_max']}), "
              f"{s['identical']} identical and {s['below_min_diff']} below --min-diff skipped, "
              f"{s['unspellable']} without a name in {opts.format}, {s['conv_skipped']} 3x3 convs skipped; "
              f"largest relative error {s['max_error']:.4f}; {s['seconds']:.1f} s")
    for tuned, why in failed.items():
        print(f"FAILED {tuned}: {why}", file=sys.stderr)
    return 2 if failed else 0
