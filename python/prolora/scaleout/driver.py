"""The Ray side of a migration: connect, start one worker actor per GPU (or per group of CPUs),
hand out batches, retry crashed ones, and feed the manifest and the progress bar as results come
back. Imported only by prolora.scaleout.migrate(), after Ray was found to be installed."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..errors import ProloraError
from .worker import BatchWorker


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address` (None: Ray's default: $RAY_ADDRESS or a running local
    cluster, else a new one; "local": always a new one on this machine; "auto": the running one).
    Returns True when this call started Ray and should shut it down."""
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address in (None, "local"):
        kw.update(include_dashboard=False, num_cpus=num_cpus)
    try:
        ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ProloraError(f"cannot reach a Ray cluster at {address or 'the default address'}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return True


def shutdown() -> None:
    ray.shutdown()


def cluster_resources() -> dict[str, float]:
    return dict(ray.cluster_resources())


RESTART_PATIENCE = 300.0  # seconds a dead worker actor may take to come back before it is given up


@dataclass
class Batch:
    names: list[str]
    attempts: int = 0  # failed tries of this exact batch (counted for single LoRAs only)


def _reason(e: BaseException) -> str:
    """A one-line reason for a failed batch."""
    if isinstance(e, RayTaskError):
        cause = getattr(e, "cause", None)
        if cause is not None and not isinstance(cause, RayTaskError):
            return " ".join(f"{type(cause).__name__}: {cause}".split())
    if isinstance(e, RayActorError):
        detail = " ".join(str(e).split())
        return f"its worker process died ({detail[:200]}{'...' if len(detail) > 200 else ''})"
    return " ".join(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".split())


class Pool:
    """Worker actors and the work in flight on them (one batch per actor at a time).

    An actor whose process died is restarted by Ray; it gets work again only once a ping has
    come back, so that a batch is never lost to an actor that is still restarting."""

    def __init__(self, n: int, init_args: tuple, *, cpus: float, gpus: float, threads: int | None):
        actor = ray.remote(BatchWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=-1,
                                                max_task_retries=0, max_concurrency=1)
        self.init_args = init_args  # keeps shipped objects alive for actor restarts
        self.actors = [actor.remote(*init_args, threads=threads) for _ in range(n)]
        self.idle = list(range(n))
        self.inflight: dict[Any, tuple[int, Batch | None]] = {}  # None: a ping
        self.probe_at: dict[int, float] = {}  # restarting actor -> when to ping it next
        self.down_since: dict[int, float] = {}  # restarting actor -> when it died
        self.lost: str | None = None  # why the last actor given up on was

    @property
    def alive(self) -> bool:
        """Whether any actor is working, idle, or still worth waiting for."""
        return bool(self.idle or self.inflight or self.probe_at)

    @property
    def busy(self) -> bool:
        return any(b is not None for _, b in self.inflight.values())

    def submit(self, batch: Batch, inputs: list[str]) -> None:
        i = self.idle.pop(0)
        self.inflight[self.actors[i].run.remote(inputs)] = (i, batch)

    def _probe(self) -> None:
        now = time.monotonic()
        for i, at in list(self.probe_at.items()):
            if at <= now:
                del self.probe_at[i]
                self.inflight[self.actors[i].ping.remote()] = (i, None)

    def wait(self, timeout: float) -> list[tuple[Batch, dict | None, BaseException | None]]:
        """Batches that finished (or failed) within `timeout` seconds."""
        self._probe()
        if not self.inflight:
            time.sleep(min(timeout, 0.1))
            return []
        ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=timeout)
        out = []
        for ref in ready:
            i, batch = self.inflight.pop(ref)
            try:
                value = ray.get(ref)
            except RayActorError as e:  # died (or still restarting, for a ping): ping it again later
                since = self.down_since.setdefault(i, time.monotonic())
                if time.monotonic() - since < RESTART_PATIENCE:
                    self.probe_at[i] = time.monotonic() + 0.5
                else:
                    self.lost = " ".join(str(e).split())[:400]
                if batch is not None:
                    out.append((batch, None, e))
                continue
            except RayTaskError as e:  # the batch raised; the worker itself is fine
                self.idle.append(i)
                out.append((batch, None, e))
                continue
            self.down_since.pop(i, None)
            self.idle.append(i)
            if batch is not None:
                out.append((batch, value, None))
        return out

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors, self.inflight = [], {}


class Sink(Protocol):
    """Where fan_out reports (the migration job on the driver)."""

    def done(self, result: dict, worker: str, attempts: int) -> None: ...
    def failed(self, name: str, error: str, attempts: int) -> None: ...
    def batch_done(self, stats: dict) -> None: ...
    def retry(self, names: list[str], reason: str) -> None: ...
    def tick(self) -> None: ...


def fan_out(pool: Pool, batches: list[list[str]], inputs: dict[str, str], max_attempts: int, sink: Sink) -> None:
    """Run every batch to an end: each LoRA reaches sink.done or sink.failed exactly once.

    A batch that raises or whose worker dies is split in halves and retried (no attempt counted),
    so a LoRA that brings its worker down is isolated; a single LoRA gets `max_attempts` tries."""
    queue = deque(Batch(b) for b in batches)
    while queue or pool.busy:
        if not pool.alive:  # every worker given up on: the rest fails, the job does not hang
            for b in queue:
                for name in b.names:
                    sink.failed(name, f"{name}: no worker left to run it ({pool.lost})", b.attempts)
            return
        while queue and pool.idle:
            b = queue.popleft()
            pool.submit(b, [inputs[n] for n in b.names])
        for batch, out, err in pool.wait(timeout=0.5):
            if out is not None:
                for r in out["results"]:
                    sink.done(r, out["worker"], batch.attempts + 1)
                for f in out["failures"]:
                    sink.failed(f["name"], f["error"], batch.attempts + 1)
                sink.batch_done(out["stats"])
                continue
            reason = _reason(err)
            sink.retry(batch.names, reason)
            if len(batch.names) > 1:
                half = len(batch.names) // 2
                queue.extendleft([Batch(batch.names[half:]), Batch(batch.names[:half])])
            elif batch.attempts + 1 < max_attempts:
                queue.appendleft(Batch(batch.names, batch.attempts + 1))
            else:
                sink.failed(batch.names[0], f"{batch.names[0]}: failed on {max_attempts} tries: {reason}",
                            max_attempts)
        sink.tick()


def put(obj: Any) -> Any:
    """Place `obj` in Ray's object store once; actors given the reference receive the value."""
    return ray.put(obj)
