"""`prolora demo`: a tiny synthetic pair and a LoRA, transferred, the report printed."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..ops.projection import METHODS
from ..options import DEFAULT_METHOD


def register(sub) -> None:
    d = sub.add_parser("demo", help="generate a tiny SDXL-shaped pair and a LoRA, transfer it, print the report")
    d.add_argument("--dir", metavar="DIR", help="keep the demo files in DIR (default: a temporary folder)")
    d.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD)
    d.set_defaults(run=cmd_demo)


def cmd_demo(a: argparse.Namespace) -> int:
    from ..api import transfer
    from ..synthetic import make_demo

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
