"""A migration worker: runs batches of LoRAs through transfer_many (one pass over the layer
chunks per batch) with the base models kept open. Plain Python; the Ray driver wraps it in an
actor, so this module never imports ray.

Writes are idempotent: an output's bytes depend only on the input, the models and the options,
and transfer_many replaces it atomically, so a batch retried after a crash (even one that had
already written some outputs) leaves the same complete files.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from ..transfers import Failure, TransferResult, transfer_many
from ..cache import BasisCache
from ..checkpoints import BaseModel
from ..families import open_model
from ..engine import EngineStats
from ..options import TransferOptions
from ..safetensors_io import atomic_path
from .manifest import file_sha256

# Testing hook: in a folder named by this variable, a file `raise-NAME` makes every batch that
# holds LoRA NAME raise, and a file `kill-NAME` kills the worker process right after NAME's output
# is written (the file is removed first, so exactly one worker dies for it).
FAULT_ENV = "PROLORA_FAULT_DIR"


def _fault(kind: str, name: str) -> None:
    folder = os.environ.get(FAULT_ENV)
    if not folder:
        return
    f = Path(folder) / f"{kind}-{name}"
    if kind == "raise" and f.exists():
        raise RuntimeError(f"injected failure for {name}")
    if kind == "kill":
        try:
            f.unlink()
        except FileNotFoundError:
            return
        os._exit(17)


def pack_cache(root: Path, model_ids: list[str]) -> dict[str, bytes]:
    """The cache entries of the given models as {relative path: bytes}, to ship to workers."""
    out: dict[str, bytes] = {}
    for mid in model_ids:
        d = root / "bases" / mid[:32]
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


def unpack_cache(entries: dict[str, bytes], root: Path) -> int:
    """Write shipped entries under `root` (atomically; present files of the same size are kept)."""
    n = 0
    for rel, data in entries.items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or parts[:1] != ("bases",):
            raise ValueError(f"refusing cache entry path {rel!r}")
        dest = root / rel
        if dest.is_file() and dest.stat().st_size == len(data):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            tmp.write_bytes(data)
        n += 1
    return n


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class BatchWorker:
    """Transfers batches of LoRAs into `output_dir`; one per GPU or per group of CPUs."""

    def __init__(self, source: str, target: str, output_dir: str, options: TransferOptions,
                 shipped: dict[str, bytes] | None = None, threads: int | None = None):
        self.source, self.target, self.out_dir, self.opts = source, target, Path(output_dir), options
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._models: tuple[BaseModel, BaseModel] | None = None
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.unpacked = unpack_cache(shipped, BasisCache(options.cache_dir).root) if shipped else 0

    def _open(self) -> tuple[BaseModel, BaseModel]:
        if self._models is None:  # on the first batch, so that a missing model is a batch error
            self._models = (open_model(self.source), open_model(self.target))
        return self._models

    def ping(self) -> str:
        """Answers once the worker is up (after a restart, too)."""
        return self.name

    def run(self, inputs: list[str]) -> dict[str, Any]:
        """Transfer `inputs` (paths); returns per-LoRA results and failures, and engine figures."""
        t0 = time.perf_counter()
        src, tgt = self._open()
        for p in inputs:
            _fault("raise", Path(p).name)
        failures: list[dict[str, str]] = []
        before: dict[str, tuple[tuple[int, int], str]] = {}
        for p in inputs:
            try:
                before[p] = (_stat(p), file_sha256(p))
            except OSError as e:
                failures.append({"name": Path(p).name, "error": f"{p}: cannot read: {e.strerror or e}"})

        def written(r: TransferResult | Failure) -> None:
            if isinstance(r, TransferResult) and r.output is not None:
                _fault("kill", r.output.name)

        if not before:
            return {"worker": self.name, "results": [], "failures": failures, "stats": _stats(None, t0)}
        batch = transfer_many(src, tgt, list(before), self.out_dir, self.opts, overwrite=True, on_result=written)
        results = []
        for r in batch.results:
            p = str(r.report.info.get("lora"))
            name = r.output.name
            if not _unchanged(p, before[p][0]):  # the output may not be what the input is now
                failures.append({"name": name, "error": f"{p}: changed while it was being transferred; rerun"})
                continue
            s = r.report.summary()
            results.append({"name": name, "input_sha256": before[p][1], "output": name,
                            "output_sha256": file_sha256(r.output), "layers": f"{s['transferred']}/{s['layers']}",
                            "warnings": list(r.report.warnings)})
        failures += [{"name": Path(f.lora).name, "error": f.error} for f in batch.failures]
        return {"worker": self.name, "results": results, "failures": failures, "stats": _stats(batch.stats, t0)}


def _unchanged(path: str, stat: tuple[int, int]) -> bool:
    try:
        return _stat(path) == stat
    except OSError:
        return False


def _stats(st: EngineStats | None, t0: float) -> dict[str, Any]:
    """A batch's engine figures, for the driver's totals."""
    st = st or EngineStats()
    return {"bytes_read": st.bytes_read, "cache_hits": st.cache_hits, "cache_misses": st.cache_misses,
            "seconds": {**{k: round(v, 4) for k, v in st.seconds.items()}, "wall": round(time.perf_counter() - t0, 4)}}
