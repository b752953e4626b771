"""Measured winners: on which GPU, for which op, size and dtype a Triton or native backend beat
torch, as written by benchmarks/gpu_check.sh. Dispatch consults this table so that custom
kernels are chosen on a GPU only where a measurement says they win; with no table (or no entry
for this device) torch stays the default.

The table is a JSON file: the packaged gpu_winners.json beside this module, or the file named by
PROLORA_WINNERS. Its format:
    {"device": "NVIDIA H200", "versions": {...},
     "points": [{"op": "truncated_svd", "backend": "gram-triton", "dtype": "float32",
                 "shape": [1280, 1280], "batch": 8, "speedup": 2.1, "accurate": true}, ...]}
speedup is the torch baseline's time over the backend's time at that point; `accurate` says the
backend met the op's accuracy contract there. A point may carry its own "device".
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .registry import Problem

ENV_VAR = "PROLORA_WINNERS"
PACKAGED = Path(__file__).with_name("gpu_winners.json")
MIN_SPEEDUP = 1.05  # below this a "win" is noise: torch stays


@dataclass(frozen=True)
class Point:
    """One benchmark point of one backend."""

    op: str
    backend: str
    device: str
    dtype: str
    shape: tuple[int, ...]
    batch: int
    speedup: float
    accurate: bool

    @property
    def wins(self) -> bool:
        return self.accurate and self.speedup >= MIN_SPEEDUP


def table_path() -> Path | None:
    """The table in force: $PROLORA_WINNERS if set, else the packaged one if present."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return PACKAGED if PACKAGED.is_file() else None


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> tuple[Point, ...]:
    data = json.loads(Path(path).read_text())
    return parse(data)


def parse(data: dict) -> tuple[Point, ...]:
    """Points of a table (a dict as loaded from JSON); malformed points raise ValueError."""
    device = data.get("device", "")
    out = []
    for i, p in enumerate(data.get("points", [])):
        try:
            out.append(Point(op=str(p["op"]), backend=str(p["backend"]), device=str(p.get("device", device)),
                             dtype=str(p["dtype"]), shape=tuple(int(x) for x in p.get("shape", ())),
                             batch=int(p.get("batch", 1)), speedup=float(p["speedup"]),
                             accurate=bool(p.get("accurate", False))))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"winners table: point {i} is malformed ({exc}): {p}") from None
    return tuple(out)


def load_points() -> tuple[Point, ...]:
    """Points of the table in force (empty without one). A broken table counts as none."""
    path = table_path()
    if path is None or not path.is_file():
        return ()
    try:
        return _load(str(path), path.stat().st_mtime)
    except (OSError, ValueError):
        return ()


def device_name(device: str) -> str:
    """The CUDA device name of "cuda" or "cuda:N" (as torch reports it)."""
    import torch

    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    return torch.cuda.get_device_name(index)


def _distance(p: Point, problem: Problem) -> float:
    """Log-scale distance between a measured point and a problem (shape dims, then batch)."""
    shape = tuple(problem.shape[-len(p.shape):]) if p.shape else ()
    d = sum(abs(math.log(max(a, 1) / max(b, 1))) for a, b in zip(p.shape, shape))
    return d + 0.5 * abs(math.log(max(p.batch, 1) / max(problem.batch, 1)))


def verdict(op: str, backend: str, problem: Problem, points: tuple[Point, ...] | None = None,
            device: str | None = None) -> str | None:
    """None when measurements on this device say `backend` is the fastest accurate way to run
    `op` for `problem` (beating torch by MIN_SPEEDUP), else why not, in one line.

    Each measured case (shape, batch) has one winner: the accurate backend with the largest
    speedup, or torch if none reaches MIN_SPEEDUP. A problem takes the nearest case's winner;
    a problem of unknown shape needs `backend` to win every measured case.
    """
    points = load_points() if points is None else points
    if not any(p.op == op and p.backend == backend for p in points):
        return (f"no measurement of {op}/{backend} on any GPU: torch stays the default "
                f"(benchmarks/gpu_check.sh measures it; PROLORA_WINNERS names a table)")
    device = device if device is not None else device_name(problem.device)
    mine = [p for p in points if p.op == op and p.device == device and p.dtype == problem.dtype]
    if not any(p.backend == backend for p in mine):
        return (f"no measurement of {op}/{backend} ({problem.dtype}) on {device}: torch stays the "
                f"default (benchmarks/gpu_check.sh measures it; PROLORA_WINNERS names a table)")
    cases: dict[tuple, list[Point]] = {}
    for p in mine:
        cases.setdefault((p.shape, p.batch), []).append(p)
    winners = {key: max((p for p in ps if p.wins), key=lambda p: p.speedup, default=None)
               for key, ps in cases.items()}
    if not problem.shape:
        lost = [key for key, w in winners.items() if w is None or w.backend != backend]
        if not lost:
            return None
        return (f"measured on {device}: fastest at {len(winners) - len(lost)} of {len(winners)} sizes; "
                f"without a shape it is chosen only if it wins at all of them")
    key = min(cases, key=lambda k: _distance(cases[k][0], problem))
    w = winners[key]
    if w is not None and w.backend == backend:
        return None
    where = f"{'x'.join(map(str, key[0]))} batch {key[1]}"
    if w is None:
        return f"measured on {device} at {where}: nothing beats torch by {MIN_SPEEDUP}x"
    return f"measured on {device} at {where}: {w.backend} is faster ({w.speedup:.2f}x vs torch)"
