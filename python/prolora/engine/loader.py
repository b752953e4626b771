"""The loader: what a chunk needs from disk, read in a background thread while the previous chunk
computes. Cached bases where the cache has them, raw weights (read by key with pread) otherwise;
on a GPU run both land in pinned host memory so that their copy to the device is asynchronous."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

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
        """The weight as a matrix in its stored dtype (pinned for a GPU run)."""
        ref = model.weights[module]
        W = model.load(module, dtype=None)
        self.bytes_read += W.numel() * W.element_size()
        W = W.reshape(ref.shape[0], -1)
        # a weight of a model held in memory may be on the device already (checkpoints.memory)
        return W.pin_memory() if self.pinned and W.device.type == "cpu" else W

    def cached(self, model: BaseModel, module: str, k) -> Basis | None:
        """The cache's basis of a module with at least the k asked (an int or a chooser)."""
        if self.cache is None:
            return None
        b = self.cache.get(model.identity(), module, flat_shape(model, module), k, self.dtype)
        if b is not None and self.pinned:
            b = b.map(torch.Tensor.pin_memory)
        return b

    def prefetch(self, modules: list[str], targets: dict[str, str] | None = None,
                 keep: frozenset[str] = frozenset()) -> dict[str, Prefetched]:
        """Runs in the loader thread: cached source bases, and the weights that are not cached.
        `targets` maps a source module to its target module (default: the same name); the source
        weights of `keep` (modules whose adapter's dW needs them: DoRA) are read even when cached."""
        t0 = time.perf_counter()
        out = {}
        for m in modules:
            p = Prefetched(target=(targets or {}).get(m, m))
            if self.cache is not None:
                p.src = self.cached(self.source, m, self.chooser(m))
                p.tgt_stored_k = self.cache.stored_k(self.target.identity(), p.target, self.dtype)
                if p.src is not None and p.tgt_stored_k >= self.target_k(p.src, p.target):
                    p.tgt = self.cached(self.target, p.target, self.target_k(p.src, p.target))
            if p.src is None or m in keep:
                p.Ws = self.read(self.source, m)
            if p.tgt_stored_k == 0 and not on_device(self.target, p.target):
                p.Wt = self.read(self.target, p.target)  # else read where it is used (bases.py)
            out[m] = p
        self.seconds += time.perf_counter() - t0
        return out
