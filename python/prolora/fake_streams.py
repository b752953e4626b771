"""The asynchronous half of the fake CUDA device (prolora.fake_cuda): streams and events that
order work as CUDA orders it, pinned host memory, and a CUDA generator, all on the host.

What is checked, as a real device would need it:
- a tensor written on one stream (an upload on a copy stream) and read on another before that
  stream waited for an event recorded after the write raises `StreamRace` (on a GPU: garbage);
- a host tensor filled by a non-blocking download and read by the host before an event, stream
  or device synchronize covers the copy raises `HostRace`;
- pinning is tracked: `pin_memory()` and `pin_memory=True` factories register their storage,
  and non-blocking copies between the device and unpinned host memory are refused by the
  harness (`UnpinnedCopy`), where CUDA would quietly make them synchronous or unsafe.

Streams keep a clock per stream (one tick per device op issued on it); an event records a
stream's clock and what that stream had already waited for; a stream that waits on the event
sees everything up to it. A storage's last writer is (stream, clock).
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch

DEVICE = torch.device("cuda", 0)


class StreamRace(RuntimeError):
    """A stream read a tensor that another stream wrote, with no event ordering the two."""


class HostRace(RuntimeError):
    """The host read memory that a non-blocking device-to-host copy had not finished filling."""


class UnpinnedCopy(RuntimeError):
    """A non-blocking copy between the device and pageable (unpinned) host memory."""


class FakeStream:
    """A CUDA stream of the fake device: a clock and what it has waited for."""

    def __init__(self, clocks: "Clocks", name: str = "side"):
        self.clocks, self.name = clocks, name
        self.clock = 0
        self.seen: dict[FakeStream, int] = {}
        self.device = DEVICE
        self.device_index = 0

    def sees(self, other: "FakeStream", clock: int) -> bool:
        return other is self or self.seen.get(other, 0) >= clock

    def _merge(self, stream: "FakeStream", clock: int, snapshot: dict) -> None:
        with self.clocks.lock:
            for s, c in ((stream, clock), *snapshot.items()):
                if s is not self and c > self.seen.get(s, 0):
                    self.seen[s] = c

    def wait_event(self, event: "FakeEvent") -> None:
        if event.stream is not None:
            self._merge(event.stream, event.clock, event.snapshot)

    def wait_stream(self, stream: "FakeStream") -> None:
        self.wait_event(FakeEvent().record(stream))

    def record_event(self, event: "FakeEvent | None" = None) -> "FakeEvent":
        return (event or FakeEvent()).record(self)

    def synchronize(self) -> None:
        self.clocks.host_wait(self, self.clock, dict(self.seen), f"{self.name} stream synchronize")

    def query(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"FakeStream({self.name}, clock={self.clock})"


class FakeEvent:
    """A CUDA event of the fake device."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.stream: FakeStream | None = None
        self.clock = 0
        self.snapshot: dict[FakeStream, int] = {}

    def record(self, stream: FakeStream | None = None) -> "FakeEvent":
        stream = stream or _CLOCKS.current()
        with stream.clocks.lock:
            self.stream, self.clock, self.snapshot = stream, stream.clock, dict(stream.seen)
        return self

    def wait(self, stream: FakeStream | None = None) -> None:
        (stream or _CLOCKS.current()).wait_event(self)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.clocks.host_wait(self.stream, self.clock, self.snapshot, "event synchronize")

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: "FakeEvent") -> float:
        return 0.0


class Clocks:
    """The streams of one fake device, the writer of every device storage, the pending
    downloads into host memory, and the host's view of the streams. `on_sync(reason)` is told of
    every host synchronization."""

    def __init__(self, on_sync):
        self.lock = threading.RLock()
        self.default = FakeStream(self, "default")
        self.writer: dict[int, tuple[FakeStream, int]] = {}  # device storage -> last write
        self.pending: dict[int, tuple[FakeStream, int]] = {}  # host storage -> download not yet seen
        self.host_seen: dict[FakeStream, int] = {}
        self.on_sync = on_sync
        self._tls = threading.local()

    # -- the current stream (per thread, as in CUDA) --------------------------------------------
    def current(self) -> FakeStream:
        return getattr(self._tls, "stream", None) or self.default

    @contextlib.contextmanager
    def use(self, stream: FakeStream | None):
        before = getattr(self._tls, "stream", None)
        self._tls.stream = stream if stream is not None else before
        try:
            yield stream
        finally:
            self._tls.stream = before

    def set_current(self, stream: FakeStream) -> None:
        self._tls.stream = stream

    # -- ordering ---------------------------------------------------------------------------------
    def tick(self) -> FakeStream:
        s = self.current()
        with self.lock:
            s.clock += 1
        return s

    def check_read(self, key: int, what: str) -> None:
        s = self.current()
        w = self.writer.get(key)
        if w is not None and not s.sees(*w):
            raise StreamRace(f"{what}: reads on the {s.name} stream a tensor written on the {w[0].name} stream "
                             f"(op {w[1]}) with no event between them")

    def wrote(self, key: int, stream: FakeStream) -> None:
        self.writer[key] = (stream, stream.clock)

    def forget(self, key: int) -> None:
        self.writer.pop(key, None)

    # -- the host side ---------------------------------------------------------------------------
    def download(self, key: int, stream: FakeStream) -> None:
        """A non-blocking copy on `stream` fills host storage `key`."""
        with self.lock:
            self.pending[key] = (stream, stream.clock)

    def check_host(self, key: int, what: str) -> None:
        p = self.pending.get(key)
        if p is None:
            return
        if self.host_seen.get(p[0], 0) >= p[1]:
            with self.lock:
                self.pending.pop(key, None)
            return
        raise HostRace(f"{what}: the host reads memory that a non-blocking copy on the {p[0].name} stream is "
                       f"still filling (no event, stream or device synchronize since)")

    def host_wait(self, stream: FakeStream, clock: int, snapshot: dict, reason: str) -> None:
        with self.lock:
            for s, c in ((stream, clock), *snapshot.items()):
                self.host_seen[s] = max(self.host_seen.get(s, 0), c)
        self.on_sync(reason)

    def synchronize_all(self, reason: str = "device synchronize") -> None:
        with self.lock:
            streams = {self.default, *self.host_seen, *(w[0] for w in self.writer.values()),
                       *(p[0] for p in self.pending.values())}
            for s in streams:
                self.host_seen[s] = s.clock
        self.on_sync(reason)


class _Active:
    """The Clocks of the fake device in use (one at a time): what the patched torch.cuda
    functions and FakeEvent.record() consult."""

    clocks: Clocks | None = None

    def current(self) -> FakeStream:
        if self.clocks is None:
            raise RuntimeError("a fake CUDA stream used outside FakeCuda()")
        return self.clocks.current()


_CLOCKS = _Active()


class Pinned:
    """Host storages that are pinned (page-locked) on the fake device, by data pointer, held by
    the tensors that pinned them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count: dict[int, int] = {}

    def add(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        with self.lock:
            self.count[key] = self.count.get(key, 0) + 1
        weakref.finalize(t, self._drop, key)
        return t

    def _drop(self, key: int) -> None:
        with self.lock:
            n = self.count.get(key, 0) - 1
            if n <= 0:
                self.count.pop(key, None)
            else:
                self.count[key] = n

    def has(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self.count or t.numel() == 0


class _CudaGenerator(torch.Generator):
    """A host generator that says it is on cuda:0: torch's factories accept it, and the fake
    device runs the draw on the host (the same values as a CPU generator of that seed)."""

    @property
    def device(self) -> torch.device:  # noqa: D401
        return DEVICE


_RealGenerator = torch.Generator


class _GeneratorType(type):
    """torch.Generator under the fake device: calling it makes a `_CudaGenerator` for a CUDA
    device (else a real one), and isinstance() still recognises every real generator."""

    def __call__(cls, device="cpu"):
        if device is not None and torch.device(device).type == "cuda":
            return _CudaGenerator("cpu")
        return _RealGenerator(device)

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, _RealGenerator)


class FakeGenerator(metaclass=_GeneratorType):
    """Stands in for torch.Generator inside FakeCuda()."""


def patches(clocks: Clocks) -> dict[str, object]:
    """The torch.cuda attributes the fake device replaces, for streams and events."""
    _CLOCKS.clocks = clocks

    def stream_ctx(stream=None):
        return clocks.use(stream)

    return {"Stream": lambda device=None, priority=0, **kw: FakeStream(clocks),
            "Event": FakeEvent,
            "current_stream": lambda device=None: clocks.current(),
            "default_stream": lambda device=None: clocks.default,
            "stream": stream_ctx,
            "set_stream": clocks.set_current,
            "synchronize": lambda device=None: clocks.synchronize_all()}


def release() -> None:
    _CLOCKS.clocks = None
