"""Bases of matching source and target layers: from the cache (via the loader), else computed by
the truncated_svd op, batched over same-shape layers and dispatched per shape and batch. On a GPU
run the bases stay on the device for the similarity and the projection (their spectra, which
only the host reads, stay on the host); only cache entries go back to the host, on a side
stream, and a writer thread stores them (engine/writer.py)."""
from __future__ import annotations

import time

import torch

from ..cache import BasisCache
from ..checkpoints import BaseModel
from ..ops import Basis, truncated_svd
from ..ops.registry import Problem, override_for
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
    CacheWriter) stores cache entries off the compute path; without one they are stored here."""

    def __init__(self, source: BaseModel, target: BaseModel, opts: TransferOptions, cache: BasisCache | None,
                 writer=None):
        self.source, self.target, self.opts, self.cache = source, target, opts, cache
        self.device = torch.device(opts.device)
        self.dtype = basis_dtype(opts)
        self.io = DeviceIO(self.device, opts.max_memory or default_budget()) if self.device.type == "cuda" else None
        self.loader = Loader(source, target, opts.subspace, cache, self.dtype, self.device, self.io)
        self.writer = writer
        self.seconds = {"basis": 0.0}
        self.backends: set[str] = set()  # the truncated_svd backends that ran
        self.batches = 0  # truncated_svd calls
        if cache is not None:
            for m in (source, target):
                cache.register(m.identity(), m.name, m.family)

    def _on_device(self, b: Basis) -> Basis:
        """U and V on the compute device (the spectrum S stays where it is: only the host reads it)."""
        if b.U.device == self.device:
            return b
        move = lambda t: t.to(self.device)  # noqa: E731  (host bases: the CPU path, or a cache hit there)
        return Basis(move(b.U), b.S, move(b.V), b.energy)

    def _store(self, model: BaseModel, module: str, b: Basis, backend: str) -> None:
        if self.cache is None:
            return
        if self.writer is not None:
            self.writer.put(model.identity(), module, b, flat_shape(model, module), backend)
        else:
            self.cache.put(model.identity(), module, b, flat_shape(model, module), backend)

    def _compute(self, model: BaseModel, weights: dict[str, torch.Tensor], ks: dict[str, object]) -> dict[str, Basis]:
        """Batched bases for same-shape weights, dispatched per shape and batch; stored in the cache."""
        t0 = time.perf_counter()
        by_shape: dict[tuple, list[str]] = {}
        for m, W in weights.items():
            by_shape.setdefault((tuple(W.shape), W.dtype), []).append(m)
        out = {}
        for (shape, dtype), names in by_shape.items():
            problem = Problem(device=self.device.type, dtype=str(dtype).removeprefix("torch."), shape=shape,
                              batch=len(names))
            backend = truncated_svd.choose(problem, override_for(truncated_svd, self.opts.backends)).backend
            self.backends.add(backend.name)
            self.batches += 1
            # weights are on the compute device already (uploaded by the loader) on a GPU run
            stack = torch.stack([weights[m].to(self.device) for m in names])
            bases = backend.fn(stack, [ks[m] for m in names], dtype=self.dtype)
            del stack
            for m, b in zip(names, bases):
                if self.io is not None:
                    b = b.columns()  # the layer-out every use takes; the cache entry's rows are then one copy
                out[m] = b
                self._store(model, m, b, backend.name)
        self.seconds["basis"] += time.perf_counter() - t0
        return out

    def bases(self, pre: dict[str, Prefetched]) -> dict[str, tuple[Basis, Basis]]:
        """(source basis at its chosen k, target basis at the same k) per module, on the device."""
        if self.io is not None:
            for ev in {id(p.ready): p.ready for p in pre.values()}.values():
                self.io.wait(ev)
        src = {m: self._on_device(p.src) for m, p in pre.items() if p.src is not None}
        missing = {m: p.Ws for m, p in pre.items() if p.src is None}
        src.update(self._compute(self.source, missing, {m: self.loader.chooser(m) for m in missing}))
        tgt: dict[str, Basis] = {}
        need: dict[str, torch.Tensor] = {}
        ks: dict[str, int] = {}
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
        if self.io is not None and uploaded:
            self.io.wait(self.loader.fence())
        tgt.update(self._compute(self.target, need, {t: ks[t] for t in need}))
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
