"""The loader: what a chunk needs from disk, read in a background thread while the previous chunk
computes (`read_ahead`, for every pass over models: transfers and extract alike). Cached bases
where the cache has them, raw weights (read by key with pread) otherwise; on a GPU run both land
in pinned host memory so that their copy to the device is asynchronous."""
from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

import torch

from ..cache import BasisCache
from ..checkpoints import BaseModel
from ..method import KMode
from ..ops import Basis


def flat_shape(model: BaseModel, module: str) -> tuple[int, int]:
    """(out, in * kh * kw): the matrix a weight is as far as bases go."""
    s = model.weights[module].shape
    return s[0], math.prod(s[1:])


def on_device(model: BaseModel, module: str) -> bool:
    """A weight held in memory on a device (checkpoints.memory): nothing to read ahead, so it is
    taken where the compute runs, not in the loader thread."""
    ref = model.weights[module]
    held = model.resident.get(ref.file)
    return held is not None and held.get(ref.key).device.type != "cpu"


C = TypeVar("C")
D = TypeVar("D")


class read_ahead(Generic[C, D]):
    """`for chunk, data in read_ahead(chunks, read)`: each chunk with read(chunk), in order, the
    next chunk read in a background thread while the caller computes the current one (one chunk
    in flight). Use it in a `with`: leaving cancels a read not yet started and waits for a running
    one. The iterator keeps no reference to a chunk's data once handed over, so what the caller
    frees is freed."""

    def __init__(self, chunks: Sequence[C], read: Callable[[C], D], name: str = "prolora-load"):
        self.chunks, self.read = chunks, read
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.at = 0
        self.ahead: Future | None = self.pool.submit(read, chunks[0]) if chunks else None

    def __enter__(self) -> "read_ahead[C, D]":
        return self

    def __exit__(self, *exc) -> None:
        if self.ahead is not None:
            self.ahead.cancel()
        self.pool.shutdown(wait=True)

    def __iter__(self) -> "read_ahead[C, D]":
        return self

    def __next__(self) -> tuple[C, D]:
        if self.ahead is None:
            raise StopIteration
        data = self.ahead.result()
        i = self.at = self.at + 1
        self.ahead = self.pool.submit(self.read, self.chunks[i]) if i < len(self.chunks) else None
        return self.chunks[i - 1], data


def read_weight(model: BaseModel, module: str, pinned: bool = False) -> torch.Tensor:
    """A weight as a matrix (out, in * kh * kw) in its stored dtype; in pinned host memory for a
    GPU run (a weight of a model held in memory may be on the device already: checkpoints.memory)."""
    W = model.load(module, dtype=None).reshape(model.weights[module].shape[0], -1)
    return W.pin_memory() if pinned and W.device.type == "cpu" else W


@dataclass
class Prefetched:
    """What the loader found or read for one module."""

    target: str = ""  # the matching target module
    src: Basis | None = None
    Ws: torch.Tensor | None = None
    Wt: torch.Tensor | None = None
    tgt_stored_k: int = 0
    tgt: Basis | None = None  # the target basis from the cache, when the source's k was known


class Loader:
    """Reads weights and cached bases of the source and target models for a compute device."""

    def __init__(self, source: BaseModel, target: BaseModel, subspace: KMode, cache: BasisCache | None,
                 dtype: torch.dtype, device: torch.device):
        self.source, self.target, self.subspace, self.cache = source, target, subspace, cache
        self.dtype = dtype  # of the bases, as cached
        self.pinned = device.type == "cuda"
        self.bytes_read = 0
        self.seconds = 0.0

    def chooser(self, module: str):
        """k of the source basis of `module`, from its spectrum (the --subspace mode)."""
        d = min(flat_shape(self.source, module))
        mode = self.subspace
        return lambda S, energy: mode.choose(d, S, energy)

    def target_k(self, src: Basis, target: str) -> int:
        """k of a target basis: the source's, or all a narrower target has (--widths lstsq)."""
        return min(src.k, *flat_shape(self.target, target))

    def read(self, model: BaseModel, module: str) -> torch.Tensor:
        """The weight as a matrix in its stored dtype (pinned for a GPU run), counted."""
        W = read_weight(model, module, self.pinned)
        self.bytes_read += W.numel() * W.element_size()
        return W

    def cached(self, model: BaseModel, module: str, k) -> Basis | None:
        """The cache's basis of a module with at least the k asked (an int or a chooser)."""
        if self.cache is None:
            return None
        b = self.cache.get(model.identity(), module, flat_shape(model, module), k, self.dtype)
        if b is not None and self.pinned:
            b = b.map(torch.Tensor.pin_memory)
        return b

    def prefetch(self, modules: list[str], targets: dict[str, str] | None = None) -> dict[str, Prefetched]:
        """Runs in the loader thread: cached source bases, and the weights that are not cached.
        `targets` maps a source module to its target module (default: the same name)."""
        t0 = time.perf_counter()
        out = {}
        for m in modules:
            p = Prefetched(target=(targets or {}).get(m, m))
            if self.cache is not None:
                p.src = self.cached(self.source, m, self.chooser(m))
                p.tgt_stored_k = self.cache.stored_k(self.target.identity(), p.target, self.dtype)
                if p.src is not None and p.tgt_stored_k >= self.target_k(p.src, p.target):
                    p.tgt = self.cached(self.target, p.target, self.target_k(p.src, p.target))
            if p.src is None:
                p.Ws = self.read(self.source, m)
            if p.tgt_stored_k == 0 and not on_device(self.target, p.target):
                p.Wt = self.read(self.target, p.target)  # else read where it is used (bases.py)
            out[m] = p
        self.seconds += time.perf_counter() - t0
        return out
