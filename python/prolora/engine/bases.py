"""Bases of matching source and target layers: from the cache (via the loader), else computed by
the truncated_svd op, dispatched per shape and batch. On a CPU the bases of a chunk's layers run
concurrently on host threads, one BLAS thread each (ops/host.py), for backends that allow it; the
target's are computed after the source's, each warm-started from its source basis where the
eigensolver uses a start; CPU cache entries are written by a background thread, at most one chunk
behind. On a GPU run same-shape layers are batched, the bases stay on the device for the similarity
and the projection (their spectra, which only the host reads, stay on the host); only cache entries
go back to the host, on a side stream, and a writer thread stores them (engine/writer.py)."""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..cache import BasisCache
from ..checkpoints import BaseModel
from ..ops import Basis, topk_eigh, truncated_svd
from ..ops.host import Clock, host_map
from ..ops.registry import Backend, Problem, override_for
from ..options import TransferOptions
from .device import DeviceIO
from .loader import Loader, Prefetched, flat_shape
from .memory import default_budget


def basis_dtype(opts: TransferOptions) -> torch.dtype:
    """The reference path computes bases in float64, every fast backend in float32."""
    forced = override_for(truncated_svd, opts.backends)
    return torch.float64 if forced == truncated_svd.reference.name else torch.float32


class BasisProvider:
    """Top-k bases of matching source and target layers, on the compute device. `writer` (a
    CacheWriter) stores a GPU run's cache entries off the compute path."""

    def __init__(self, source: BaseModel, target: BaseModel, opts: TransferOptions, cache: BasisCache | None,
                 background_writes: bool = False, writer=None):
        """`background_writes`: on a CPU run, cache entries are written by a background thread (then
        close() once done, so that the cache is complete); else before bases() returns. A GPU run
        with a `writer` gives it its entries instead."""
        self.source, self.target, self.opts, self.cache = source, target, opts, cache
        self.device = torch.device(opts.device)
        self.background = background_writes and self.device.type == "cpu"
        self.dtype = basis_dtype(opts)
        self.io = DeviceIO(self.device, opts.max_memory or default_budget()) if self.device.type == "cuda" else None
        self.loader = Loader(source, target, opts.subspace, cache, self.dtype, self.device, self.io)
        self.writer = writer
        self.batches = 0  # truncated_svd calls (on a CPU with host threads: one per matrix)
        self.seconds = {"basis": 0.0, "cache_write": 0.0}
        self.clock = Clock()  # thread-seconds of the basis phases (gram, eigensolver, recover)
        self.backends: set[str] = set()  # the truncated_svd backends that ran
        self.solvers: dict[str, int] = {}  # bases per eigensolver path ("eigh", "subspace", "eigh (fallback)")
        self.fallbacks: list[dict[str, str]] = []  # layers an iterative eigensolver handed to eigh, and why
        self._pool: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []
        if cache is not None:
            for m in (source, target):
                cache.register(m.identity(), m.name, m.family)

    def _on_device(self, b: Basis) -> Basis:
        """U and V on the compute device (the spectrum S stays where it is: only the host reads it)."""
        if b.U.device == self.device:
            return b
        move = lambda t: t.to(self.device)  # noqa: E731  (host bases: the CPU path, or a cache hit there)
        return Basis(move(b.U), b.S, move(b.V), b.energy, b.solver)

    def _backend(self, shape: tuple, dtype: torch.dtype, batch: int) -> Backend:
        problem = Problem(device=self.device.type, dtype=str(dtype).removeprefix("torch."), shape=shape, batch=batch)
        backend = truncated_svd.choose(problem, override_for(truncated_svd, self.opts.backends)).backend
        self.backends.add(backend.name)
        return backend

    def _compute(self, model: BaseModel, weights: dict[str, torch.Tensor], ks: dict[str, object],
                 warm: dict[str, torch.Tensor] | None = None) -> dict[str, Basis]:
        """Bases for the weights, dispatched per shape and batch; stored in the cache."""
        t0 = time.perf_counter()
        by_shape: dict[tuple, list[str]] = {}
        for m, W in weights.items():
            by_shape.setdefault((tuple(W.shape), W.dtype), []).append(m)
        extra = dict(eig=override_for(topk_eigh, self.opts.backends), clock=self.clock)
        out: dict[str, Basis] = {}
        pooled: list[tuple[Backend, str]] = []
        for (shape, dtype), names in by_shape.items():
            backend = self._backend(shape, dtype, len(names))
            if backend.host_threads and self.device.type == "cpu":
                pooled += [(backend, m) for m in names]
                continue
            self.batches += 1
            # weights are on the compute device already (uploaded by the loader) on a GPU run
            stack = torch.stack([weights[m].to(self.device) for m in names])
            warms = [warm.get(m) if warm else None for m in names]
            bases = backend.fn(stack, [ks[m] for m in names], dtype=self.dtype, **backend.kwargs(warm=warms, **extra))
            del stack
            if self.io is not None:  # the layout every use takes; the cache entry's rows are then one copy
                bases = [b.columns() for b in bases]
            out.update(zip(names, ((b, backend) for b in bases)))

        def one(item: tuple[Backend, str]) -> Basis:
            backend, m = item
            w = [warm.get(m)] if warm else None
            return backend.fn(weights[m], ks[m], dtype=self.dtype, **backend.kwargs(warm=w, **extra))

        pooled.sort(key=lambda item: -weights[item[1]].numel())  # largest first: the threads finish together
        self.batches += len(pooled)
        out.update(zip((m for _, m in pooled), zip(host_map(one, pooled), (b for b, _ in pooled))))
        result = {}
        for m, (b, backend) in out.items():
            result[m] = b
            self._count(model, m, b)
        self._store(model, result, {m: backend.name for m, (_, backend) in out.items()})
        self.seconds["basis"] += time.perf_counter() - t0
        return result

    def _count(self, model: BaseModel, module: str, b: Basis) -> None:
        solver = b.solver or "full"
        key = solver.split(" (")[0] + (" (fallback)" if "fallback" in solver else "")
        self.solvers[key] = self.solvers.get(key, 0) + 1
        if "fallback" in solver:
            side = "source" if model is self.source else "target"
            self.fallbacks.append({"module": module, "model": side, "why": solver.split("fallback: ", 1)[-1][:-1]})

    def _store(self, model: BaseModel, bases: dict[str, Basis], backends: dict[str, str]) -> None:
        """Cache entries, in the background at most one chunk behind (what waits stays bounded)."""
        if self.cache is None or not bases:
            return
        if self.writer is not None:  # a GPU run: copies on the side stream, a writer thread (engine/writer.py)
            for m, b in bases.items():
                self.writer.put(model.identity(), m, b, flat_shape(model, m), backends[m])
            return
        if self._pool is None and self.background:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prolora-cache")
        ident = model.identity()
        items = [(m, b, flat_shape(model, m), backends[m]) for m, b in bases.items()]

        def write() -> None:
            t0 = time.perf_counter()
            for m, b, shape, name in items:
                self.cache.put(ident, m, b, shape, name)
            self.seconds["cache_write"] += time.perf_counter() - t0

        if self.background:
            self._writes.append(self._pool.submit(write))
        else:
            write()

    def flush(self) -> None:
        """Wait for the cache writes in flight (the cache is complete when this returns)."""
        writes, self._writes = self._writes, []
        for f in writes:
            f.result()

    def close(self) -> None:
        self.flush()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _cold_pairs(self, pre: dict[str, Prefetched]) -> dict[str, tuple[Basis, Basis]] | None:
        """A chunk with nothing cached, on a CPU: each module's source basis and then its target's
        (at the source's k, warm-started from it) as one task on a host thread, so that no thread
        waits for the other at a barrier between the sources and the targets. None where the chunk
        does not qualify (then the sources, then the targets, each phase on the host threads)."""
        mods = list(pre)
        if (self.device.type != "cpu" or len({pre[m].target for m in mods}) != len(mods) or any(
                p.src is not None or p.tgt is not None or p.Ws is None or p.Wt is None for p in pre.values())):
            return None
        backends: dict[str, tuple[Backend, Backend]] = {}
        for side, key in (("s", "Ws"), ("t", "Wt")):
            groups: dict[tuple, list[str]] = {}
            for m in mods:
                W = getattr(pre[m], key)
                groups.setdefault((tuple(W.shape), W.dtype), []).append(m)
            for (shape, dtype), names in groups.items():
                b = self._backend(shape, dtype, len(names))
                if not b.host_threads:
                    return None
                for m in names:
                    backends[m] = (b,) if side == "s" else (backends[m][0], b)
        extra = dict(eig=override_for(topk_eigh, self.opts.backends), clock=self.clock)
        t0 = time.perf_counter()

        def pair(m: str) -> tuple[Basis, Basis]:
            p, (bs, bt) = pre[m], backends[m]
            src = bs.fn(p.Ws, self.loader.chooser(m), dtype=self.dtype, **bs.kwargs(**extra))
            if self.source is self.target and p.target == m:  # cache build: one model, one basis
                return src, src
            k = self.loader.target_k(src, p.target)
            warm = [src.U if src.U.shape[0] <= src.V.shape[0] else src.V] \
                if flat_shape(self.target, p.target) == flat_shape(self.source, m) else None
            return src, bt.fn(p.Wt, k, dtype=self.dtype, **bt.kwargs(warm=warm, **extra))

        mods.sort(key=lambda m: -pre[m].Ws.numel())  # largest first: the threads finish together
        self.batches += 2 * len(mods)
        done = dict(zip(mods, host_map(pair, mods)))
        for m, (s, t) in done.items():
            self._count(self.source, m, s)
            if t is not s:
                self._count(self.target, pre[m].target, t)
        self._store(self.source, {m: s for m, (s, _) in done.items()}, {m: backends[m][0].name for m in mods})
        self._store(self.target, {pre[m].target: t for m, (_, t) in done.items()},
                    {pre[m].target: backends[m][1].name for m in mods})
        self.seconds["basis"] += time.perf_counter() - t0
        return {m: (s.columns(), t.truncate(min(s.k, t.k)).columns()) for m, (s, t) in done.items()}

    def bases(self, pre: dict[str, Prefetched]) -> dict[str, tuple[Basis, Basis]]:
        """(source basis at its chosen k, target basis at the same k) per module, on the device."""
        self.flush()  # the previous chunk's cache entries: writes stay at most one chunk behind
        if self.io is not None:
            for ev in {id(p.ready): p.ready for p in pre.values()}.values():
                self.io.wait(ev)
        cold = self._cold_pairs(pre)
        if cold is not None:
            return cold
        src = {m: self._on_device(p.src) for m, p in pre.items() if p.src is not None}
        missing = {m: p.Ws for m, p in pre.items() if p.src is None}
        src.update(self._compute(self.source, missing, {m: self.loader.chooser(m) for m in missing}))
        tgt: dict[str, Basis] = {}
        need: dict[str, torch.Tensor] = {}
        ks: dict[str, int] = {}
        warm: dict[str, torch.Tensor] = {}
        uploaded = False  # read by this thread (not the loader's), so waited for here
        for m, p in pre.items():
            t, k = p.target, self.loader.target_k(src[m], p.target)
            ks[t] = max(ks.get(t, 0), k)
            if p.tgt is not None:
                tgt[t] = self._on_device(p.tgt)
                continue
            if p.Wt is None and p.tgt_stored_k >= k:
                uploaded = True
                hit = self.loader.cached(self.target, t, k)
                if hit is not None:
                    tgt[t] = self._on_device(hit)
                    continue
            uploaded = uploaded or p.Wt is None
            need[t] = p.Wt if p.Wt is not None else self.loader.read(self.target, t)
            if flat_shape(self.target, t) == flat_shape(self.source, m):
                s = src[m]  # the source basis on the Gram side: a start for an iterative eigensolver
                warm[t] = s.U if s.U.shape[0] <= s.V.shape[0] else s.V
        if self.io is not None and uploaded:
            self.io.wait(self.loader.fence())
        tgt.update(self._compute(self.target, need, {t: ks[t] for t in need}, warm))
        return {m: (src[m].columns(), tgt[p.target].truncate(min(src[m].k, tgt[p.target].k)).columns())
                for m, p in pre.items()}

    def basis_of(self, side: str, module: str, k: int | None = None) -> Basis:
        """One basis: the source module at its own k (k=None), or any module at a given k."""
        model = self.source if side == "source" else self.target
        spec = self.loader.chooser(module) if k is None else k
        hit = self.loader.cached(model, module, spec)
        if hit is None:
            hit = self._compute(model, {module: self.loader.fetch(model, module)}, {module: spec})[module]
        elif self.io is not None:
            self.io.wait(self.loader.fence())
        return self._on_device(hit)
