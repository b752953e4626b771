"""Host-side plumbing of the basis computation: seconds per phase (Clock) and running the bases of
different layers concurrently on host threads, one BLAS thread each (host_map).

Why one BLAS thread per matrix: the dense symmetric eigensolver is mostly memory-bound level-2
work (the tridiagonal reduction) and scales poorly over cores, and on a shared machine a 2-thread
OpenMP team stalls whenever another process holds a core (measured: 10 eigh of 1280 x 1280 took
14-31 s with 2 threads under load against 3-4 s with one). Two layers at a time on one thread
each keep both cores busy with independent work. Every matrix is always computed on one thread,
whatever the pool size or batch, so an answer never depends on how layers were grouped.
"""
from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


class Clock:
    """Seconds per phase, summed over the threads that report them (thread-safe)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


@contextlib.contextmanager
def timed(clock: Clock | None, phase: str) -> Iterator[None]:
    if clock is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        clock.add(phase, time.perf_counter() - t0)


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Limit BLAS libraries other than torch's (scipy's OpenBLAS) to n threads, where
    threadpoolctl is installed; torch's own threads are set per worker."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(n, user_api="blas"):
        yield


def host_threads() -> int:
    """How many layers run at once on the host: torch's thread count (the cores it may use)."""
    return max(1, torch.get_num_threads())


def host_map(fn: Callable[[T], R], items: Sequence[T], threads: int | None = None) -> list[R]:
    """[fn(x) for x in items], run on `threads` host threads (default host_threads()) with one
    torch/BLAS thread each; torch's thread count is restored afterwards. The first exception is
    raised once every started item has finished."""
    threads = host_threads() if threads is None else threads
    before = torch.get_num_threads()

    def one(x: T) -> R:
        torch.set_num_threads(1)
        return fn(x)

    try:
        with blas_threads(1):
            if threads <= 1 or len(items) <= 1:
                return [one(x) for x in items]
            with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="prolora-basis") as ex:
                return list(ex.map(one, items))
    finally:
        torch.set_num_threads(before)
