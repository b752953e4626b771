"""The device side of a GPU run: how data crosses between host and device without stalling the
compute stream.

- Up: weights and cached bases are read from disk straight into a ring of pinned staging
  buffers (one copy) and copied to the device on a copy stream; the compute stream waits on an
  event recorded after them (`fence`, `wait`), never the host. The ring is bounded (`Staging`):
  the host holds at most its size of a chunk's weights, whatever the chunk's size on the device.
- Down: cache entries and finished factors are copied into pinned host memory on a second
  stream after the compute stream's work so far (`download`); the host reads them only after an
  event says they arrived (`mark`, then the event's synchronize: one wait for many copies).
- Host waits on the compute thread are few and counted (the fake device counts them in tests,
  `benchmarks/gpu_transfer.py` with torch's sync debug mode on a GPU): per chunk one read of
  every module's similarity figures and one wait for the finished factors; per basis batch (one
  shape of one model in a chunk) the eigensolver's error check and one copy of the spectra and
  energies (k is chosen on the host); per compressed LoRA layer the core SVD's error check and
  one read of its two energies. `host_waits` is that bound.
- Worker threads (the loader, the cache writer) run through `in_worker`, which enters whatever
  `WORKER_CONTEXTS` holds: nothing on a real GPU; the fake CUDA device (prolora.fake_cuda) puts
  its thread-local modes there so that it sees those threads too.
"""
from __future__ import annotations

import functools
import threading
from contextlib import ExitStack
from typing import Callable, ContextManager

import torch

# factories of context managers every worker thread enters (see the module docstring)
WORKER_CONTEXTS: list[Callable[[], ContextManager]] = []

SLOT_BYTES = 32 << 20  # one pinned staging buffer: weights larger than this go up in pieces
MIN_SLOTS = 2


def host_waits(chunks: int, basis_batches: int, compressed_layers: int) -> int:
    """The most host synchronizations the compute thread of a GPU run makes (module docstring)."""
    return 2 * chunks + 2 * basis_batches + 2 * compressed_layers


def in_worker(fn: Callable) -> Callable:
    """`fn` run inside every context of WORKER_CONTEXTS (as they are when it is called)."""
    contexts = list(WORKER_CONTEXTS)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with ExitStack() as stack:
            for make in contexts:
                stack.enter_context(make())
            return fn(*args, **kwargs)
    return run


def staging_bytes(host_budget: int) -> int:
    """The pinned staging ring of a GPU run: an eighth of the host budget, 2 to 16 slots."""
    return max(MIN_SLOTS, min(16, host_budget // 8 // SLOT_BYTES)) * SLOT_BYTES


def pending_bytes(host_budget: int) -> int:
    """How much of the cache entries on their way to disk a GPU run holds in pinned memory."""
    return max(64 << 20, min(2 << 30, host_budget // 4))


class Staging:
    """A ring of pinned host buffers. A slot is taken for one piece of an upload and given back
    with the event after which its copy is done; taking it again waits for that event (in the
    thread that takes it: the loader, not the compute stream)."""

    def __init__(self, total: int, slot: int = SLOT_BYTES):
        self.slot = slot
        self.count = max(MIN_SLOTS, total // slot)
        self.buffers: list[torch.Tensor | None] = [None] * self.count
        self.events: list[object | None] = [None] * self.count
        self.next = 0
        self.lock = threading.Lock()

    def take(self) -> tuple[int, torch.Tensor]:
        with self.lock:
            i = self.next
            self.next = (i + 1) % self.count
            ev, self.events[i] = self.events[i], None
        if ev is not None:
            ev.synchronize()
        if self.buffers[i] is None:
            self.buffers[i] = torch.empty(self.slot, dtype=torch.uint8, pin_memory=True)
        return i, self.buffers[i]

    def give(self, i: int, event) -> None:
        self.events[i] = event


class DeviceIO:
    """Streams and staging of one GPU run (see the module docstring)."""

    def __init__(self, device: torch.device, host_budget: int):
        self.device = device
        self.compute = torch.cuda.current_stream(device)  # made in the compute thread
        self.copy = torch.cuda.Stream(device)
        self.back = torch.cuda.Stream(device)
        self.staging = Staging(staging_bytes(host_budget))
        self.lock = threading.Lock()  # uploads from the loader and the compute thread share the ring

    # -- up ----------------------------------------------------------------------------------------
    def upload(self, nbytes: int, fill: Callable[[torch.Tensor, int], None]) -> torch.Tensor:
        """A device uint8 tensor of `nbytes`, filled piece by piece: fill(buffer, offset) writes
        bytes offset.. of the data into the pinned `buffer` (a pread), which then goes up on the
        copy stream. The compute stream must wait on a later `fence()` before reading it."""
        with torch.cuda.stream(self.copy):  # memory of the copy stream: nothing else is using it
            dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dev.record_stream(self.compute)  # freed after the compute stream is done with it
        with self.lock:
            for off in range(0, nbytes, self.staging.slot):
                n = min(self.staging.slot, nbytes - off)
                i, buf = self.staging.take()
                piece = buf[:n]
                fill(piece, off)
                with torch.cuda.stream(self.copy):
                    dev[off:off + n].copy_(piece, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self.copy)
                self.staging.give(i, done)
        return dev

    def upload_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor (any memory) on the device, through the staging ring."""
        flat = t.contiguous().reshape(-1).view(torch.uint8)
        dev = self.upload(flat.numel(), lambda buf, off: buf.copy_(flat[off:off + buf.numel()]))
        return dev.view(t.dtype).reshape(t.shape)

    def fence(self):
        """An event after every upload issued so far."""
        ev = torch.cuda.Event()
        ev.record(self.copy)
        return ev

    def wait(self, event) -> None:
        """The compute stream waits for `event` (no host synchronization)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    # -- down --------------------------------------------------------------------------------------
    def download(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pinned host copies of device tensors, copied on the back stream after the compute
        stream's work so far. They hold their values only once an event recorded after them
        (`mark`) has completed."""
        self.back.wait_stream(torch.cuda.current_stream(self.device))
        out = []
        with torch.cuda.stream(self.back):
            for t in tensors:
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                t.record_stream(self.back)
                out.append(h)
        return out

    def mark(self):
        """An event after every download issued so far."""
        ev = torch.cuda.Event()
        ev.record(self.back)
        return ev
