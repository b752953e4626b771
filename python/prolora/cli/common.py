"""What every command group shares: progress bars, the transfer option group and the options it
makes, backend overrides, and one-line errors for unwritable outputs. No math lives here."""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Callable

from ..errors import OutputPathError
from ..options import DEFAULT_SUBSPACE, DEFAULT_TAU

Handler = Callable[[argparse.Namespace], int]


def progress_factory(quiet: bool):
    """A progress callback factory (total, desc) -> update, drawing one tqdm bar at a time on
    stderr, with `.close()` and `.write(line, file)`; None when `quiet`."""
    if quiet:
        return None
    from tqdm import tqdm

    bars = []

    def factory(total: int, desc: str):
        for b in bars:  # stages run one after another (matching, then each pass): one bar at a time
            b.close()
        bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, leave=False, dynamic_ncols=True)
        bars.append(bar)
        return bar.update

    factory.close = lambda: [b.close() for b in bars]  # type: ignore[attr-defined]
    factory.write = lambda line, file=None: tqdm.write(line, file=file)  # type: ignore[attr-defined]
    return factory


def add_common(p: argparse.ArgumentParser) -> None:
    """The options transfer and similarity share: subspace, tau, device, backends, budgets, cache."""
    p.add_argument("--subspace", default=DEFAULT_SUBSPACE, metavar="MODE",
                   help="how k is chosen per layer: energy:F, ratio:F or rank:K (default %(default)s)")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU,
                   help="transfer a layer only if min(phi_left, phi_right) >= tau (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--backend", default=None, metavar="SPEC",
                   help="force backends: NAME or op=NAME,... (e.g. reference: the float64 full-SVD path; "
                        "also PROLORA_BACKEND); see `prolora backends`")
    p.add_argument("--max-memory", metavar="SIZE", help="host memory budget for weights in flight, e.g. 2GB")
    p.add_argument("--max-gpu-memory", metavar="SIZE", help="GPU memory budget, e.g. 16GB")
    p.add_argument("--cache-dir", metavar="DIR", help="basis cache folder (default $PROLORA_CACHE_DIR or ~/.cache/prolora)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the basis cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")


@contextmanager
def writing(path):
    """An OS error while writing `path` (a full disk, ...) becomes a one-line error naming it."""
    try:
        yield
    except OSError as e:
        raise OutputPathError(f"{path}: cannot write: {e.strerror or e}") from None


def overrides(spec: str | None) -> dict[str, str]:
    """--backend SPEC over $PROLORA_BACKEND, as {op: backend}."""
    from ..ops import overrides_from_env, parse_overrides

    return {**overrides_from_env(), **parse_overrides(spec)}


def options(a: argparse.Namespace, **extra):
    """TransferOptions from the common option group (add_common) and `extra` fields."""
    from ..options import TransferOptions

    return TransferOptions(subspace=a.subspace, tau=a.tau, device=a.device, backends=overrides(a.backend),
                           max_memory=a.max_memory, max_gpu_memory=a.max_gpu_memory, cache=not a.no_cache,
                           cache_dir=a.cache_dir, **extra)


def say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text)
