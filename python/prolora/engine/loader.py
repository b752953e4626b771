"""The loader: what a chunk needs from disk, read in a background thread while the previous chunk
computes (`read_ahead`, for every pass over models: transfers and extract alike). Cached bases
where the cache has them, raw weights (read by key with pread) otherwise. On a GPU run (`io`
given) both are read straight into pinned staging buffers and copied to the device on the copy
stream (engine/device.py): a chunk arrives as device tensors plus the event after which they hold
their values, and the host holds only the staging ring."""
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
from ..safetensors_io import DTYPES, ITEMSIZE, SafetensorsFile
from .device import DeviceIO


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


def file_range(model: BaseModel, module: str) -> tuple[SafetensorsFile, str, int, int, torch.dtype] | None:
    """(file, key, byte offset, bytes, dtype) of a weight stored as one contiguous range of a
    file (whole or a row range), or None (several pieces, transposed, or held in memory)."""
    ref = model.weights[module]
    if ref.pieces or ref.transposed or ref.file in model.resident:
        return None
    f = model._file(ref.file)
    if not isinstance(f, SafetensorsFile):
        return None
    info = f.info(ref.key)
    row = math.prod(info.shape[1:]) * ITEMSIZE[info.dtype]
    start, stop = ref.rows or (0, info.shape[0])
    return f, ref.key, start * row, (stop - start) * row, DTYPES[info.dtype]


@dataclass
class Prefetched:
    """What the loader found or read for one module."""

    target: str = ""  # the matching target module
    src: Basis | None = None
    Ws: torch.Tensor | None = None
    Wt: torch.Tensor | None = None
    tgt_stored_k: int = 0
    tgt: Basis | None = None  # the target basis from the cache, when the source's k was known
    ready: object | None = None  # GPU run: the event after which the uploads of the chunk are done


class Loader:
    """Reads weights and cached bases of the source and target models for a compute device."""

    def __init__(self, source: BaseModel, target: BaseModel, subspace: KMode, cache: BasisCache | None,
                 dtype: torch.dtype, device: torch.device, io: DeviceIO | None = None):
        self.source, self.target, self.subspace, self.cache = source, target, subspace, cache
        self.dtype = dtype  # of the bases, as cached
        self.io = io
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
        """The weight as a matrix in its stored dtype: on the host, or on a GPU run on the
        device (read into pinned staging, uploaded on the copy stream: see `fence`)."""
        ref = model.weights[module]
        shape = flat_shape(model, module)
        if self.io is None or on_device(model, module):
            W = model.load(module, dtype=None)
            self.bytes_read += W.numel() * W.element_size()
            return W.reshape(ref.shape[0], -1)
        where = file_range(model, module)
        if where is None:  # fused pieces or a transposed tensor: read, then staged (two copies)
            W = model.load(module, dtype=None)
            self.bytes_read += W.numel() * W.element_size()
            return self.io.upload_tensor(W.reshape(shape))
        f, key, offset, nbytes, dtype = where
        self.bytes_read += nbytes
        dev = self.io.upload(nbytes, lambda buf, off: f.read_into(key, offset + off, buf))
        return dev.view(dtype).reshape(shape)

    def cached(self, model: BaseModel, module: str, k) -> Basis | None:
        """The cache's basis of a module with at least the k asked (an int or a chooser); on a
        GPU run its vectors go up like weights and its spectrum stays on the host."""
        if self.cache is None:
            return None
        shape = flat_shape(model, module)
        if self.io is None:
            return self.cache.get(model.identity(), module, shape, k, self.dtype)
        entry = self.cache.locate(model.identity(), module, shape, k, self.dtype)
        if entry is None:
            return None
        vectors = []
        with entry.file as f:
            for name, length in (("Ut", shape[0]), ("Vt", shape[1])):
                nbytes = entry.k * length * self.dtype.itemsize
                dev = self.io.upload(nbytes, lambda buf, off, name=name: f.read_into(name, off, buf))
                vectors.append(dev.view(self.dtype).reshape(entry.k, length).T)
        return Basis(vectors[0], entry.S, vectors[1], entry.energy)

    def fence(self):
        """GPU run: the event after every upload so far (None on the CPU)."""
        return self.io.fence() if self.io is not None else None

    def fetch(self, model: BaseModel, module: str) -> torch.Tensor:
        """read() for the compute thread: the compute stream waits for the upload."""
        W = self.read(model, module)
        if self.io is not None:
            self.io.wait(self.io.fence())
        return W

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
        ready = self.fence()
        for p in out.values():
            p.ready = ready
        self.seconds += time.perf_counter() - t0
        return out
