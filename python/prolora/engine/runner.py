"""The job runner: one pass over the models for a batch of LoRA tasks. Per chunk of modules, in
model order: the loader's reads (one chunk ahead, in a background thread: loader.read_ahead) ->
bases -> each module's similarity, formed once for every LoRA on it -> the projection of all its
LoRAs, through the project_lora backend dispatched for that module -> finished layers parked
until their LoRA is complete -> on_done(task), which writes the output."""
from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..cache import BasisCache
from ..checkpoints import BaseModel
from ..method import Similarity, similarity_many
from ..ops import Basis, project_lora
from ..ops.registry import Backend, Problem, override_for
from ..options import TransferOptions
from ..plan import LayerJob
from ..spill import Spill
from .bases import BasisProvider
from .device import in_worker, pending_bytes
from .loader import read_ahead
from .memory import budget as host_budget, current_rss, peak_rss, trim_near
from .planner import chunk_limit, chunk_modules
from .results import JobResult, LoraTask, factors, matrix_shape, realize, run_job
from .writer import writer_for

Progress = Callable[[int], None]


@dataclass
class EngineStats:
    modules: int = 0
    chunks: int = 0
    bytes_read: int = 0
    peak_rss: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0
    basis_batches: int = 0  # truncated_svd calls (one per shape of each model in a chunk)
    backends: dict[str, str] = field(default_factory=dict)  # op -> the backends that ran it
    matching: list[dict] = field(default_factory=list)  # block matches, when layers were matched by similarity
    passes: int = 0
    # the bases' phases in thread-seconds (summed over the host threads computing them: gram,
    # eigensolver, recover), bases per eigensolver path, and the layers an iterative eigensolver
    # handed to a dense eigh (module, model, why)
    basis_phases: dict[str, float] = field(default_factory=dict)
    solvers: dict[str, int] = field(default_factory=dict)
    fallbacks: list[dict] = field(default_factory=list)

    def add(self, other: "EngineStats") -> None:
        """Fold in the stats of a further pass over the models."""
        self.modules = max(self.modules, other.modules)
        self.chunks += other.chunks
        self.bytes_read += other.bytes_read
        self.peak_rss = max(self.peak_rss, other.peak_rss)
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
        self.cache_hits += other.cache_hits
        self.cache_misses += other.cache_misses
        self.basis_batches += other.basis_batches
        self.backends = self.backends or other.backends
        for name in ("basis_phases", "solvers"):
            mine = getattr(self, name)
            for k, v in getattr(other, name).items():
                mine[k] = mine.get(k, 0) + v
        self.fallbacks += other.fallbacks
        self.passes += 1


class _CannotPark(Exception):
    pass


def _spill_folder(tasks: list[LoraTask]) -> str | None:
    """Where finished layers wait: beside the outputs (a disk with room for them; /tmp may be
    RAM-backed tmpfs), else the system's temporary folder."""
    return next((str(t.output.parent) for t in tasks if t.output is not None), None)


class Engine:
    """Streams the modules of many LoRA tasks through bases and the method under memory budgets."""

    def __init__(self, source: BaseModel, target: BaseModel, opts: TransferOptions,
                 cache: BasisCache | None = None, progress: Progress | None = None):
        self.source, self.target, self.opts, self.cache = source, target, opts, cache
        self.progress = progress
        self.stats = EngineStats()
        self.project_backends: set[str] = set()
        self._to_host = None  # GPU run: non-blocking copies of finished factors (DeviceIO.download)
        self._similarity_s = 0.0  # within the projection phase: the similarity and the writes
        self._write_s = 0.0

    def chunks(self, modules: list[str]) -> list[list[str]]:
        """Consecutive modules whose working memory fits the budgets (at least one per chunk)."""
        gpu = self.opts.max_gpu_memory if self.opts.device.startswith("cuda") else None
        limit = chunk_limit(host_budget(self.opts.max_memory), current_rss(), gpu)
        return chunk_modules(modules, None, limit, self.source)

    def run(self, tasks: list[LoraTask], on_done: Callable[[LoraTask], None]) -> EngineStats:
        """Process every task; call on_done(task) as soon as each one is complete (or failed)."""
        t0 = time.perf_counter()
        work: dict[str, list[tuple[LoraTask, LayerJob]]] = {}
        targets: dict[str, str] = {}
        for task in tasks:
            for job in task.plan.jobs:
                work.setdefault(job.module, []).append((task, job))
                if targets.setdefault(job.module, job.target_module) != job.target_module:
                    raise ValueError(f"{job.module} maps to two target modules in one batch")
        for task in tasks:
            if task.done:
                on_done(task)
        order = [m for m in self.source.weights if m in work]
        self.stats.modules = len(order)
        # modules whose adapter's dW needs the source weight (DoRA): it is read even when cached
        keep = frozenset(m for m in order if any(job.lora.needs_base for _, job in work[m]))
        if self.opts.method == "copy":
            for m in order:
                weight = self.source.load(m, dtype=None) if m in keep else None
                self._apply(m, work[m], None, None, on_done, weight=weight)
            self.stats.seconds = {"total": time.perf_counter() - t0}
            return self.stats
        provider = BasisProvider(self.source, self.target, self.opts, self.cache, background_writes=True)
        loader, io = provider.loader, provider.io
        provider.writer = writer = writer_for(self.cache, io, pending_bytes(host_budget(self.opts.max_memory)))
        self._to_host = io.download if io is not None else None
        seen = (self.cache.hits, self.cache.misses) if self.cache is not None else (0, 0)
        chunks = self.chunks(order)
        self.stats.chunks = len(chunks)
        budget = host_budget(self.opts.max_memory)
        project_s = 0.0
        prefetch = in_worker(loader.prefetch)
        written = on_done

        def on_done(task: LoraTask) -> None:  # the output's write, timed
            t = time.perf_counter()
            written(task)
            self._write_s += time.perf_counter() - t

        with read_ahead(chunks, lambda chunk: prefetch(chunk, targets, keep)) as reads, \
                closing(Spill(_spill_folder(tasks))) as spill, closing(provider):  # closed: CPU cache entries written
            try:
                for chunk, pre in reads:
                    weights = {m: pre[m].Ws for m in chunk if m in keep}
                    bases = provider.bases(pre)
                    del pre
                    t1 = time.perf_counter()
                    shared = self._similarities(chunk, work, bases)
                    self._similarity_s += time.perf_counter() - t1
                    pending: list | None = [] if io is not None else None
                    for m in chunk:
                        src, tgt = bases.pop(m)
                        self._apply(m, work[m], src, tgt, on_done, spill, shared.pop(m, None), pending,
                                    weights.pop(m, None))
                    if pending:  # the chunk's finished factors: one wait for all their copies
                        io.mark().synchronize()
                        for task, res in pending:
                            self._finish(task, res, on_done, spill)
                    trim_near(budget)  # near the budget: give back the heap's holes
                    project_s += time.perf_counter() - t1
                if writer is not None:
                    writer.close()
                    writer = None
            finally:
                if writer is not None:  # failed: stop the writer, keep the first error
                    writer.abandon()
        self.stats.bytes_read = loader.bytes_read
        self.stats.basis_batches = provider.batches
        self.stats.seconds = {"load": loader.seconds, **provider.seconds, "similarity": self._similarity_s,
                              "write": self._write_s,
                              "project": project_s - self._similarity_s - self._write_s,
                              "total": time.perf_counter() - t0}
        self.stats.basis_phases = dict(provider.clock.seconds)
        self.stats.solvers, self.stats.fallbacks = dict(provider.solvers), list(provider.fallbacks)
        self.stats.backends = {"truncated_svd": ",".join(sorted(provider.backends)),
                               "project_lora": ",".join(sorted(self.project_backends))}
        if self.cache is not None:
            self.stats.cache_hits, self.stats.cache_misses = self.cache.hits - seen[0], self.cache.misses - seen[1]
        self.stats.peak_rss = peak_rss()
        return self.stats

    def _project_backend(self, src: Basis, shape: tuple[int, int], items) -> Backend:
        """The project_lora backend for one module's LoRAs, dispatched on the real problem."""
        problem = Problem(device=src.U.device.type, dtype=str(src.U.dtype).removeprefix("torch."), shape=shape,
                          batch=len(items), k=src.k, r=max(job.lora.rank for _, job in items))
        backend = project_lora.choose(problem, override_for(project_lora, self.opts.backends)).backend
        self.project_backends.add(backend.name)
        return backend

    def _projected(self, backend: Backend, items, src: Basis, tgt: Basis, shared: Similarity) -> dict[int, tuple]:
        """The (up, down) of every LoRA on the module, projected together by `backend` (its
        batched form when it has one), when the gate lets the module through; else {}. A failure
        here falls back to projecting each job alone, so that only the LoRA at fault fails."""
        if min(shared.sims["phi_left"], shared.sims["phi_right"]) < self.opts.tau:
            return {}
        live = [(i, job) for i, (task, job) in enumerate(items) if task.error is None and not job.widths_differ]
        try:
            got = backend.many([factors(job, src) for _, job in live], src.U, src.V, tgt.U, tgt.V,
                               self.opts.method, cross=shared.cross)
        except Exception:
            return {}
        return {i: p for (i, _), p in zip(live, got)}

    def _similarities(self, chunk: list[str], work, bases) -> dict[str, Similarity]:
        """Each module's similarity (for every LoRA on it), the chunk's figures read at once."""
        items = {}
        for m in chunk:
            src, tgt = bases[m]
            job = next((job for _, job in work[m] if not job.widths_differ), None)
            if src is not None and job is not None:
                items[m] = (src, tgt, matrix_shape(job))
        return dict(zip(items, similarity_many(list(items.values()))))

    def _apply(self, module: str, items, src, tgt, on_done, spill: Spill | None = None,
               shared: Similarity | None = None, pending: list | None = None,
               weight: torch.Tensor | None = None) -> None:
        """Every LoRA of one module through the method. Results are finished here, or on a GPU
        run appended to `pending` and finished once their copies to the host are done."""
        started = False  # the module's similarity, backend and joint projection, once for all LoRAs
        backend = None
        projected: dict[int, tuple] = {}
        for task, job in items:  # DoRA: its dW on the source weight, written as a LoRA
            if task.error is None and job.lora.needs_base:
                try:
                    realize(job, weight.cpu(), self.opts)
                except Exception as e:  # one LoRA's failure must not stop the others
                    task.error = f"{job.lora_key}: {type(e).__name__}: {e}"
        for n, (task, job) in enumerate(items):
            if task.error is not None:
                continue
            try:
                if not started and src is not None and not job.widths_differ:
                    started = True
                    shape = matrix_shape(job)
                    if shared is None:
                        t0 = time.perf_counter()
                        shared = similarity_many([(src, tgt, shape)])[0]
                        self._similarity_s += time.perf_counter() - t0
                    backend = self._project_backend(src, shape, items)
                    projected = self._projected(backend, items, src, tgt, shared)
                res = run_job(job, src, tgt, self.opts, shared, projected.pop(n, None),
                              backend.fn if backend is not None else None, self._to_host)
            except Exception as e:  # one LoRA's failure must not stop the others
                task.error = f"{job.lora_key}: {type(e).__name__}: {e}"
                if task.done:
                    on_done(task)
                continue
            if pending is None:
                self._finish(task, res, on_done, spill)
            else:
                pending.append((task, res))
        if self.progress:
            self.progress(1)

    def _finish(self, task: LoraTask, res: JobResult, on_done, spill: Spill | None) -> None:
        """A finished layer joins its task: parked on disk unless it completes the task."""
        if task.error is not None:  # failed meanwhile: its other layers are not needed
            return
        try:
            if spill is not None and len(task.results) + 1 < len(task.plan.jobs):
                try:  # a result completing its task is used at once
                    res.park(spill, self.opts, task.lora.dtype)
                except OSError as e:  # the spill lies beside the outputs: a full disk there
                    raise _CannotPark(f"{task.output or 'spill file'}: cannot write: {e.strerror or e}") from e
            task.results.append(res)
        except _CannotPark as e:
            task.error = str(e)
        except Exception as e:
            task.error = f"{res.job.lora_key}: {type(e).__name__}: {e}"
        if task.done:
            on_done(task)
