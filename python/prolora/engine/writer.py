"""Cache entries of a GPU run, stored off the compute path: each new basis is copied to pinned
host memory on the device's back stream (engine/device.py) and a writer thread, once the copy's
event has completed, writes it to the cache. The compute thread neither waits for the copy nor
for the disk, except when the entries in flight would pass their bound (`limit` bytes of pinned
memory), which makes it wait for the oldest one."""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..cache import BasisCache
from ..ops import Basis
from .device import DeviceIO, in_worker


class CacheWriter:
    """Stores bases computed on the device in `cache` (see the module docstring)."""

    def __init__(self, cache: BasisCache, io: DeviceIO, limit: int):
        self.cache, self.io, self.limit = cache, io, limit
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prolora-cache")
        self.inflight: deque[tuple[Future, int]] = deque()
        self.bytes = 0
        self.entries = 0

    def put(self, model_id: str, module: str, basis: Basis, shape: tuple[int, int], backend: str) -> None:
        on_device = [t.is_cuda for t in (basis.U, basis.S, basis.V)]
        moved = iter(self.io.download([t for t, d in zip((basis.U.T, basis.S, basis.V.T), on_device) if d]))
        Ut, S, Vt = (next(moved) if d else t for t, d in zip((basis.U.T, basis.S, basis.V.T), on_device))
        done = self.io.mark()
        nbytes = sum(t.numel() * t.element_size() for t in (Ut, S, Vt))
        while self.inflight and self.bytes + nbytes > self.limit:
            self._retire()
        host = Basis(Ut.T, S, Vt.T, basis.energy)
        fut = self.pool.submit(in_worker(self._write), done, model_id, module, host, shape, backend)
        self.inflight.append((fut, nbytes))
        self.bytes += nbytes
        self.entries += 1

    def _write(self, done, model_id: str, module: str, basis: Basis, shape: tuple[int, int], backend: str) -> None:
        done.synchronize()  # in this thread: the compute thread does not wait
        self.cache.put(model_id, module, basis, shape, backend)

    def _retire(self) -> None:
        fut, nbytes = self.inflight.popleft()
        try:
            fut.result()
        finally:
            self.bytes -= nbytes

    def close(self) -> None:
        """Wait for every entry to be written (the first failure is raised), then stop the thread."""
        try:
            while self.inflight:
                self._retire()
        finally:
            self.pool.shutdown(wait=True)


    def abandon(self) -> None:
        """After a failure: let the entries in flight finish (they are complete and correct), raise nothing."""
        self.pool.shutdown(wait=True)
        self.inflight.clear()


def writer_for(cache: BasisCache | None, io: DeviceIO | None, limit: int) -> CacheWriter | None:
    """A CacheWriter on a GPU run with a cache; None otherwise (entries are stored in place)."""
    if cache is None or io is None or not torch.cuda.is_available():
        return None
    return CacheWriter(cache, io, limit)
