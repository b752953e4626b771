"""Command line: argument parsing, progress, output and exit codes. No math lives here.

    common     what every group shares: progress bars, the transfer option group, --backend, output errors
    transfer   transfer
    refine     refine, and the --refine* flags transfer shares
    models     similarity, compare, inspect, cache, backends
    bench      bench (--job transfer | extract)
    demo       demo
    migrate    migrate (Ray)
    jobs       resize, merge, extract

Each group module has `register(subparsers)`, which adds its commands and sets each one's handler
(`run`); `main` parses, runs the handler and turns errors into one line and an exit status.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import Sequence

from ..errors import ProloraError
from ..version import __version__
from . import bench, demo, jobs, migrate, models, refine, transfer

# in the order `prolora --help` lists the commands
GROUPS = (transfer, refine, models, bench, demo, migrate, jobs)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prolora", description="Zero-shot LoRA transfer between diffusion base models (ProLoRA).")
    ap.add_argument("--version", action="version", version=f"prolora {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return ap


def _sigterm(signum, frame):  # turn SIGTERM into the same clean unwinding as Ctrl-C
    raise KeyboardInterrupt


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"prolora: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        with warnings.catch_warnings():
            if not args.debug:  # e.g. an unwritable cache: one line, not file:line and source
                warnings.showwarning = _one_line_warning
            return args.run(args)
    except ProloraError as e:
        if args.debug:
            raise
        print(f"prolora: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # the environment (a full disk, a vanished folder), not a bug
        if args.debug:
            raise
        msg = " ".join(f"{e.filename + ': ' if isinstance(e.filename, str) else ''}{e.strerror or e}".split())
        print(f"prolora: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prolora: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line unless --debug
        if args.debug:
            raise
        msg = " ".join(str(e).split())
        print(f"prolora: internal error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


__all__ = ["build_parser", "main"]
