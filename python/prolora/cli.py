"""Command line: argument parsing, progress, output and exit codes. No math lives here."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import ProloraError
from .lora import FORMATS
from .ops.projection import METHODS
from .options import DEFAULT_METHOD, DEFAULT_SUBSPACE, DEFAULT_TAU


def _progress_factory(quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    bars = []

    def factory(total: int, desc: str):
        bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, leave=False, dynamic_ncols=True)
        bars.append(bar)
        return bar.update

    factory.close = lambda: [b.close() for b in bars]  # type: ignore[attr-defined]
    return factory


def _precision(name: str):
    import torch

    return {"float64": torch.float64, "float32": torch.float32}[name]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subspace", default=DEFAULT_SUBSPACE, metavar="MODE",
                   help="how k is chosen per layer: energy:F, ratio:F or rank:K (default %(default)s)")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU,
                   help="transfer a layer only if min(phi_left, phi_right) >= tau (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--precision", choices=("float64", "float32"), default="float64",
                   help="compute precision of the bases and projection (default %(default)s)")
    p.add_argument("--backend", default=None, metavar="SPEC",
                   help="force backends: NAME or op=NAME,op=NAME (also PROLORA_BACKEND)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prolora", description="Zero-shot LoRA transfer between diffusion base models (ProLoRA).")
    ap.add_argument("--version", action="version", version=f"prolora {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("transfer", help="move a LoRA from SOURCE_BASE to TARGET_BASE")
    t.add_argument("source", metavar="SOURCE_BASE", help="diffusers folder or .safetensors checkpoint the LoRA was trained on")
    t.add_argument("target", metavar="TARGET_BASE", help="diffusers folder or .safetensors checkpoint to move it to")
    t.add_argument("lora", metavar="LORA", help="LoRA .safetensors (kohya, diffusers/PEFT, old diffusers, ComfyUI)")
    t.add_argument("-o", "--output", required=True, metavar="OUT", help="output .safetensors file (or an existing folder)")
    t.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="(default %(default)s)")
    t.add_argument("--rank", default="same", help="output rank: same (input rank), 2r (exact), or N (default %(default)s)")
    t.add_argument("--format", choices=("same",) + FORMATS, default="same", help="output format (default: as the input)")
    t.add_argument("--alpha", choices=("keep", "rank"), default="keep",
                   help="keep the input's alpha/r convention, or write alpha = rank (default %(default)s)")
    t.add_argument("--skipped", choices=("drop", "copy"), default="drop",
                   help="layers below tau: drop their adapter or copy it unchanged (default %(default)s)")
    t.add_argument("--report", metavar="FILE", help="write the per-layer report as JSON")
    t.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never an input)")
    _add_common(t)

    s = sub.add_parser("similarity", help="per-layer subspace similarity of two base models")
    s.add_argument("source", metavar="SOURCE_BASE")
    s.add_argument("target", metavar="TARGET_BASE")
    s.add_argument("--layers", metavar="REGEX", help="only modules whose canonical name matches (e.g. 'attn')")
    s.add_argument("--json", metavar="FILE", help="write the per-layer report as JSON")
    s.add_argument("--plot", metavar="FILE.png", help="write a figure of phi per layer")
    _add_common(s)

    i = sub.add_parser("inspect", help="describe a LoRA file or a base model")
    i.add_argument("path", metavar="FILE")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")

    d = sub.add_parser("demo", help="generate a tiny SDXL-shaped pair and a LoRA, transfer it, print the report")
    d.add_argument("--dir", metavar="DIR", help="keep the demo files in DIR (default: a temporary folder)")
    d.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD)
    return ap


def _overrides(spec: str | None) -> dict[str, str]:
    from .ops import overrides_from_env, parse_overrides

    return {**overrides_from_env(), **parse_overrides(spec)}


def cmd_transfer(a: argparse.Namespace) -> int:
    from .api import transfer
    from .options import TransferOptions

    opts = TransferOptions(method=a.method, subspace=a.subspace, tau=a.tau, rank=a.rank, format=a.format,
                           alpha=a.alpha, skipped=a.skipped, device=a.device,
                           compute_dtype=_precision(a.precision), backends=_overrides(a.backend))
    if a.report:
        from .api import resolve_report_path

        resolve_report_path(a.report, [a.source, a.target, a.lora])
    progress = _progress_factory(a.quiet)
    try:
        res = transfer(a.source, a.target, a.lora, a.output, opts, overwrite=a.overwrite, progress=progress)
    finally:
        if progress:
            progress.close()
    if a.report:
        res.report.write_json(a.report)
    if not a.quiet:
        print(res.report.table())
    for w in res.report.warnings:
        print(f"prolora: warning: {w}", file=sys.stderr)
    print(f"wrote {res.output}")
    return 0


def cmd_similarity(a: argparse.Namespace) -> int:
    from .api import similarity

    from .api import resolve_report_path

    for p in filter(None, (a.json, a.plot)):
        resolve_report_path(p, [a.source, a.target])
    progress = _progress_factory(a.quiet)
    try:
        res = similarity(a.source, a.target, subspace=a.subspace, tau=a.tau, layers=a.layers,
                         compute_dtype=_precision(a.precision), device=a.device,
                         backends=_overrides(a.backend), progress=progress)
    finally:
        if progress:
            progress.close()
    if a.json:
        res.report.write_json(a.json)
    if a.plot:
        from .plot import phi_plot

        phi_plot(res.report, a.plot, tau=a.tau, title=f"{res.report.info['source']} -> {res.report.info['target']}")
    if not a.quiet:
        print(res.report.table())
    return 0


def _print_facts(facts: dict, indent: str = "") -> None:
    for k, v in facts.items():
        if isinstance(v, dict):
            print(f"{indent}{k}:")
            _print_facts(v, indent + "  ")
        else:
            if isinstance(v, (list, tuple, set)):
                v = ", ".join(map(str, sorted(v, key=str))) if v else "-"
            print(f"{indent}{k}: {v}")


def cmd_inspect(a: argparse.Namespace) -> int:
    from .api import inspect

    facts = inspect(a.path)
    if a.json:
        print(json.dumps(facts, indent=2, default=lambda x: sorted(x) if isinstance(x, set) else str(x)))
    else:
        _print_facts(facts)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .api import transfer
    from .synthetic import make_demo

    with tempfile.TemporaryDirectory(prefix="prolora-demo-") as tmp:
        folder = Path(a.dir) if a.dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        paths = make_demo(folder)
        out = folder / "lora_on_target.safetensors"
        print(f"demo: source {paths['source']}\n      target {paths['target']}\n      lora   {paths['lora']}")
        res = transfer(paths["source"], paths["target"], paths["lora"], out, method=a.method, overwrite=True)
        print(res.report.table())
        print(f"wrote {out}" + ("" if a.dir else " (temporary; use --dir to keep the files)"))
    return 0


COMMANDS = {"transfer": cmd_transfer, "similarity": cmd_similarity, "inspect": cmd_inspect, "demo": cmd_demo}


def _sigterm(signum, frame):  # turn SIGTERM into the same clean unwinding as Ctrl-C
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return COMMANDS[args.command](args)
    except ProloraError as e:
        if args.debug:
            raise
        print(f"prolora: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("prolora: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line unless --debug
        if args.debug:
            raise
        msg = " ".join(str(e).split())
        print(f"prolora: internal error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
