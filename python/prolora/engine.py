"""Run layer jobs for one or many LoRAs in one pass over the base models.

Modules are processed in model order, in chunks sized to a memory budget. While one chunk
computes, a background thread reads the next chunk's weights (and cached bases). Bases come from
the on-disk cache when present and are computed batched over same-shape layers otherwise; each
module's bases serve every LoRA of the batch that touches it, and a LoRA's output is handed back
as soon as its last module is done.
"""
from __future__ import annotations

import math
import resource
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing as _closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .cache import BasisCache
from .checkpoints import BaseModel
from .lora import LoraFile, LoraModule
from .method import LayerMath, Similarity, similarity, transfer_layer, transfer_layer_widths
from .ops import Basis, project_group, project_lora, truncated_svd
from .ops.registry import Op, Problem, override_for
from .options import TransferOptions
from .plan import LayerJob, Plan
from .report import LayerRecord
from .spill import Parked, Spill

Progress = Callable[[int], None]


# ----------------------------------------------------------------------------- memory


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss()


def _libc():
    try:
        import ctypes

        lib = ctypes.CDLL(None)
        return lib if hasattr(lib, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc malloc_trim). The tensors of a pass
    are freed in an order that leaves holes the heap keeps, and resident memory can grow past
    the budget with no more memory in use (1.8 GB for 0.63 GB in use, seen with 10 SDXL LoRAs).
    It costs page faults when the memory is used again, so the engine calls it only near the
    budget. No-op without glibc."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def default_budget() -> int:
    """Without --max-memory: 2 GiB, or half the available memory if that is less."""
    budget = 2 * 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    budget = min(budget, int(line.split()[1]) * 1024 // 2)
    except OSError:
        pass
    return budget


def lora_passes(sizes: list[int], spare: int) -> list[list[int]]:
    """Consecutive groups of a batch's LoRAs (by index) whose inputs, resident for a whole pass
    over the models, take at most two thirds of `spare` (what the memory budget leaves): the
    rest is the chunks' working memory. At least one LoRA per pass."""
    limit = max(spare, 0) * 2 // 3
    out: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if not out or (used + size > limit and out[-1]):
            out.append([])
            used = 0
        out[-1].append(i)
        used += size
    return out


def module_bytes(shape: tuple[int, ...], raw_itemsize: int, weights: int) -> int:
    """Working memory for one module whose `weights` (0-2) weights must be loaded: raw bytes,
    float32 copies, Gram matrix, eigenvectors and workspace, and the bases kept."""
    m, n = shape[0], math.prod(shape[1:])
    d = min(m, n)
    per_weight = m * n * (raw_itemsize + 4) + 3 * 4 * d * d
    bases = 2 * 4 * (m + n) * d
    return weights * per_weight + bases


# ----------------------------------------------------------------------------- bases


def _dispatch(op: Op, opts: TransferOptions, problem: Problem):
    return op.choose(problem, override_for(op, opts.backends))


@dataclass
class Prefetched:
    """What the loader thread found or read for one module."""

    target: str = ""  # the matching target module
    src: Basis | None = None
    Ws: torch.Tensor | None = None
    Wt: torch.Tensor | None = None
    tgt_stored_k: int = 0
    tgt: Basis | None = None  # the target basis from the cache, when the source's k was known


class BasisProvider:
    """Top-k bases of matching source and target layers: from the cache, else computed."""

    def __init__(self, source: BaseModel, target: BaseModel, opts: TransferOptions, cache: BasisCache | None):
        self.source, self.target, self.opts, self.cache = source, target, opts, cache
        problem = Problem(device=opts.device.split(":")[0], dtype="float32")
        self.svd_choice = _dispatch(truncated_svd, opts, problem)
        self.project_choice = _dispatch(project_lora, opts, problem)
        # the reference computes in float64, every fast backend in float32
        self.dtype = torch.float64 if self.svd_choice.backend.reference else torch.float32
        self.bytes_read = 0
        self.seconds = {"load": 0.0, "basis": 0.0, "project": 0.0}
        if cache is not None:
            for m in (source, target):
                cache.register(m.identity(), m.name, m.family)

    def _chooser(self, module: str):
        shape = self.source.weights[module].shape
        d = min(shape[0], math.prod(shape[1:]))
        mode = self.opts.subspace
        return lambda S, energy: mode.choose(d, S, energy)

    def _flat_shape(self, model: BaseModel, module: str) -> tuple[int, int]:
        s = model.weights[module].shape
        return s[0], math.prod(s[1:])

    def _read(self, model: BaseModel, module: str) -> torch.Tensor:
        ref = model.weights[module]
        W = model.load(module, dtype=None)
        self.bytes_read += W.numel() * W.element_size()
        W = W.reshape(ref.shape[0], -1)
        return W.pin_memory() if self.opts.device.startswith("cuda") else W

    def _target_k(self, src: Basis, target: str) -> int:
        """k of a target basis: the source's, or all a narrower target has (--widths lstsq)."""
        return min(src.k, *self._flat_shape(self.target, target))

    def prefetch(self, modules: list[str], targets: dict[str, str] | None = None) -> dict[str, Prefetched]:
        """Runs in the loader thread: cached source bases, and the weights that are not cached.
        `targets` maps a source module to its target module (default: the same name)."""
        t0 = time.perf_counter()
        out = {}
        for m in modules:
            p = Prefetched(target=(targets or {}).get(m, m))
            if self.cache is not None:
                p.src = self.cache.get(self.source.identity(), m, self._flat_shape(self.source, m),
                                       self._chooser(m), self.dtype)
                p.tgt_stored_k = self.cache.stored_k(self.target.identity(), p.target, self.dtype)
                if p.src is not None and p.tgt_stored_k >= self._target_k(p.src, p.target):
                    p.tgt = self.cache.get(self.target.identity(), p.target, self._flat_shape(self.target, p.target),
                                           self._target_k(p.src, p.target), self.dtype)
            if p.src is None:
                p.Ws = self._read(self.source, m)
            if p.tgt_stored_k == 0:
                p.Wt = self._read(self.target, p.target)
            out[m] = p
        self.seconds["load"] += time.perf_counter() - t0
        return out

    def _compute(self, model: BaseModel, weights: dict[str, torch.Tensor], ks: dict[str, object]) -> dict[str, Basis]:
        """Batched bases for same-shape weights; stored in the cache."""
        t0 = time.perf_counter()
        by_shape: dict[tuple, list[str]] = {}
        for m, W in weights.items():
            by_shape.setdefault(tuple(W.shape), []).append(m)
        out = {}
        dev = torch.device(self.opts.device)
        for shape, names in by_shape.items():
            # per shape and batch: size-based rules and measured GPU winners apply here
            problem = Problem(device=dev.type, dtype="float32", shape=shape, batch=len(names))
            backend = _dispatch(truncated_svd, self.opts, problem).backend
            # pinned host tensors (see _read) copy asynchronously; the stack is built on the device
            stack = torch.stack([weights[m].to(dev, non_blocking=True) for m in names])
            bases = backend.fn(stack, [ks[m] for m in names], dtype=self.dtype)
            del stack
            for m, b in zip(names, bases):
                b = Basis(b.U.cpu(), b.S.cpu(), b.V.cpu(), b.energy)
                out[m] = b
                if self.cache is not None:
                    self.cache.put(model.identity(), m, b, self._flat_shape(model, m), backend.name)
        self.seconds["basis"] += time.perf_counter() - t0
        return out

    def bases(self, pre: dict[str, Prefetched]) -> dict[str, tuple[Basis, Basis]]:
        """(source basis at its chosen k, target basis at the same k) per module."""
        src = {m: p.src for m, p in pre.items() if p.src is not None}
        missing = {m: p.Ws for m, p in pre.items() if p.src is None}
        src.update(self._compute(self.source, missing, {m: self._chooser(m) for m in missing}))
        tgt: dict[str, Basis] = {}
        need: dict[str, torch.Tensor] = {}
        ks: dict[str, int] = {}
        for m, p in pre.items():
            t, k = p.target, self._target_k(src[m], p.target)
            ks[t] = max(ks.get(t, 0), k)
            if p.tgt is not None:
                tgt[t] = p.tgt
                continue
            if p.Wt is None and p.tgt_stored_k >= k:
                hit = self.cache.get(self.target.identity(), t, self._flat_shape(self.target, t), k, self.dtype)
                if hit is not None:
                    tgt[t] = hit
                    continue
            need[t] = p.Wt if p.Wt is not None else self._read(self.target, t)
        tgt.update(self._compute(self.target, need, {t: ks[t] for t in need}))
        return {m: (src[m].columns(), tgt[p.target].truncate(min(src[m].k, tgt[p.target].k)).columns())
                for m, p in pre.items()}

    def basis_of(self, side: str, module: str, k: int | None = None) -> Basis:
        """One basis: the source module at its own k (k=None), or any module at a given k."""
        model = self.source if side == "source" else self.target
        spec = self._chooser(module) if k is None else k
        hit = None
        if self.cache is not None:
            hit = self.cache.get(model.identity(), module, self._flat_shape(model, module), spec, self.dtype)
        if hit is None:
            hit = self._compute(model, {module: self._read(model, module)}, {module: spec})[module]
        return hit


# ----------------------------------------------------------------------------- jobs


@dataclass
class JobResult:
    job: LayerJob
    math: LayerMath
    module: LoraModule | None  # the output module (None: dropped); on the meta device while parked
    seconds: float
    spill: Spill | None = None
    parked: tuple[Parked, Parked] | None = None  # (down, up) in `spill`
    final: bool = False  # the module is in its output alpha convention and dtype already

    @property
    def computed(self) -> bool:
        """Factors made by the method (not copied from the input)."""
        return self.math.up is not None or self.parked is not None

    def park(self, spill: Spill, opts: TransferOptions, dtype: torch.dtype) -> None:
        """Move computed factors to `spill` until the LoRA is complete; in the output dtype when
        the alpha convention does not wait for the other layers (`keep`)."""
        if self.module is None or self.math.up is None:
            return
        m = self.module
        if opts.alpha == "keep":
            m, self.final = _with_alpha(m, self.job.lora.alpha, dtype), True
        self.spill, self.parked = spill, (spill.put(m.down), spill.put(m.up))
        self.module = LoraModule(m.key, m.down.to("meta"), m.up.to("meta"), m.alpha, m.bias)
        self.math.up = self.math.down = None

    def output(self) -> LoraModule | None:
        """The output module with its factors in memory."""
        if self.parked is None:
            return self.module
        m = self.module
        return LoraModule(m.key, self.spill.get(self.parked[0]), self.spill.get(self.parked[1]), m.alpha, m.bias)


@dataclass
class LoraTask:
    """One LoRA of a batch and its progress through the engine."""

    lora: LoraFile
    plan: Plan
    output: Path | None = None
    results: list[JobResult] = field(default_factory=list)
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or len(self.results) == len(self.plan.jobs)


def _folded_module(job: LayerJob, math_: LayerMath) -> LoraModule:
    """The transferred factors as a module with scale 1 (alpha None), conv shapes restored."""
    lm, up, down = job.lora, math_.up, math_.down
    r = up.shape[1]
    if lm.is_conv:
        kernel = job.target_shape[1:] if job.widths_differ else lm.down.shape[1:]
        up, down = up.reshape(up.shape[0], r, 1, 1), down.reshape(r, *kernel)
    return LoraModule(job.out_key, down, up, None, lm.bias)


def _copied(job: LayerJob) -> LoraModule:
    lm = job.lora
    return LoraModule(job.out_key, lm.down, lm.up, lm.alpha, lm.bias)


def _factors(job: LayerJob, basis: Basis) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of a job's LoRA module as the method takes them: B (m x r) with the scale folded
    in, A (r x n), in the bases' dtype and device."""
    lm = job.lora
    B = lm.up.reshape(job.shape[0], lm.rank).to(basis.U.dtype) * lm.scale
    A = lm.down.reshape(lm.rank, -1).to(basis.U.dtype)
    if basis.U.device != B.device:
        B, A = B.to(basis.U.device), A.to(basis.U.device)
    return B, A


def run_job(job: LayerJob, src: Basis | None, tgt: Basis | None, opts: TransferOptions,
            project=None, shared: Similarity | None = None, projected=None) -> JobResult:
    """One LoRA module through the method (no bases needed for `copy`); `projected`: its
    (up, down) when the module's LoRAs were projected together."""
    t0 = time.perf_counter()
    lm = job.lora
    if opts.method == "copy":
        if job.widths_differ:  # a copy cannot change a layer's shape
            return JobResult(job, LayerMath(None, None, False, f"target weight has shape {job.target_shape}"),
                             None, time.perf_counter() - t0)
        return JobResult(job, LayerMath(None, None, True, "copied"), _copied(job), time.perf_counter() - t0)
    # projected together: the factors are not needed again (transfer_layer takes only `projected`)
    B, A = _factors(job, src) if projected is None or job.widths_differ else (None, None)
    if job.widths_differ:
        res = transfer_layer_widths(B, A, src, tgt, tau=opts.tau, rank=opts.rank, r_in=lm.rank)
    else:
        res = transfer_layer(B, A, src, tgt, method=opts.method, tau=opts.tau, rank=opts.rank, r_in=lm.rank,
                             project=project, shared=shared, projected=projected)
    if res.transferred:
        res.up, res.down = res.up.cpu(), res.down.cpu()
        out = _folded_module(job, res)
    elif opts.skipped == "copy" and not job.widths_differ:
        out, res.reason = _copied(job), res.reason + " (copied unchanged)"
    else:
        out = None
    return JobResult(job, res, out, time.perf_counter() - t0)


def _with_alpha(m: LoraModule, alpha: float | None, dtype: torch.dtype) -> LoraModule:
    """The same dW = scale * up @ down written with `alpha` (None: scale 1), in `dtype`."""
    new_scale = 1.0 if alpha is None else alpha / m.rank
    up = m.up.double() * (m.scale / new_scale)
    return LoraModule(m.key, m.down.to(dtype).contiguous(), up.to(dtype).contiguous(), alpha, m.bias)


def finalize(results: list[JobResult], opts: TransferOptions, dtype: torch.dtype) -> dict[str, LoraModule]:
    """Output modules in the chosen alpha convention: `keep` writes each module with its input
    alpha; `rank` writes one alpha (the largest output rank) for all, since loaders such as
    diffusers apply one alpha per component. Copied modules stay bit-for-bit unless converted."""
    out: dict[str, LoraModule] = {}
    made = [r for r in results if r.module is not None and r.computed]
    top = max((r.module.rank for r in made), default=0)
    for r in results:
        m = r.output()
        if m is None or r.final:
            pass
        elif r.computed:
            m = _with_alpha(m, r.job.lora.alpha if opts.alpha == "keep" else float(top), dtype)
        elif opts.alpha == "rank" and opts.method != "copy" and top:
            m = _with_alpha(m, float(top), dtype)
        if m is not None:
            out[m.key] = m
    return out


def record(res: JobResult) -> LayerRecord:
    m, job = res.math, res.job
    return LayerRecord(
        module=job.module, source_key=job.lora_key, target_key=res.module.key if res.module else None,
        shape=job.shape, transferred=m.transferred, reason=m.reason, k=m.k, phi_left=m.phi_left,
        phi_right=m.phi_right, phi_null_left=m.phi_null_left, phi_null_right=m.phi_null_right, gap=m.gap,
        rank_in=job.lora.rank, rank_out=res.module.rank if res.module else None,
        retained_energy=m.retained_energy, seconds=round(res.seconds, 6))


# ----------------------------------------------------------------------------- the engine


@dataclass
class EngineStats:
    modules: int = 0
    chunks: int = 0
    bytes_read: int = 0
    peak_rss: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0
    backends: dict[str, str] = field(default_factory=dict)
    matching: list[dict] = field(default_factory=list)  # block matches, when layers were matched by similarity
    passes: int = 0

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
        self.backends = self.backends or other.backends
        self.passes += 1


class _CannotPark(Exception):
    pass


def _spill_folder(tasks: list[LoraTask]) -> str | None:
    """Where finished layers wait: beside the outputs (a disk with room for them; /tmp may be
    RAM-backed tmpfs), else the system's temporary folder."""
    return next((str(t.output.parent) for t in tasks if t.output is not None), None)


class Engine:
    """Streams the modules of many LoRA tasks through bases and the method under a memory budget."""

    def __init__(self, source: BaseModel, target: BaseModel, opts: TransferOptions,
                 cache: BasisCache | None = None, progress: Progress | None = None):
        self.source, self.target, self.opts, self.cache = source, target, opts, cache
        self.progress = progress
        self.stats = EngineStats()

    def chunks(self, modules: list[str]) -> list[list[str]]:
        """Consecutive modules whose working memory fits the budget (at least one per chunk)."""
        budget, gpu = self.opts.max_memory, self.opts.max_gpu_memory
        if budget is None:
            budget = default_budget()
        # the chunk computing plus the next one's raw weights in flight, over what is resident now
        limits = []
        if budget is not None:
            limits.append(max(budget - current_rss(), 0) / 1.5)
        if gpu is not None and self.opts.device.startswith("cuda"):
            limits.append(gpu / 1.5)
        avail = min(limits) if limits else float("inf")
        out: list[list[str]] = []
        cur: list[str] = []
        used = 0
        for m in modules:
            ref = self.source.weights[m]
            need = module_bytes(ref.shape, 2 if ref.dtype in ("F16", "BF16") else 4, 2)
            if cur and used + need > avail:
                out.append(cur)
                cur, used = [], 0
            cur.append(m)
            used += need
        if cur:
            out.append(cur)
        return out

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
        if self.opts.method == "copy":
            for m in order:
                self._apply(m, work[m], None, None, on_done)
            self.stats.seconds = {"total": time.perf_counter() - t0}
            return self.stats
        provider = BasisProvider(self.source, self.target, self.opts, self.cache)
        seen = (self.cache.hits, self.cache.misses) if self.cache is not None else (0, 0)
        project = provider.project_choice.backend.fn
        self.stats.backends = {"truncated_svd": provider.svd_choice.backend.name,
                               "project_lora": provider.project_choice.backend.name}
        chunks = self.chunks(order)
        self.stats.chunks = len(chunks)
        budget = self.opts.max_memory or default_budget()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prolora-load") as pool, \
                _closing(Spill(_spill_folder(tasks))) as spill:
            ahead: Future | None = pool.submit(provider.prefetch, chunks[0], targets) if chunks else None
            for i, chunk in enumerate(chunks):
                pre = ahead.result()
                ahead = pool.submit(provider.prefetch, chunks[i + 1], targets) if i + 1 < len(chunks) else None
                try:
                    bases = provider.bases(pre)
                    del pre
                    t1 = time.perf_counter()
                    for m in chunk:
                        src, tgt = bases.pop(m)
                        self._apply(m, work[m], src, tgt, on_done, project, spill)
                    if current_rss() > 0.9 * budget:  # near the budget: give back the heap's holes
                        release_free_memory()
                    provider.seconds["project"] += time.perf_counter() - t1
                except BaseException:
                    if ahead is not None:
                        ahead.cancel()
                    raise
        self.stats.bytes_read = provider.bytes_read
        self.stats.seconds = {**provider.seconds, "total": time.perf_counter() - t0}
        if self.cache is not None:
            self.stats.cache_hits, self.stats.cache_misses = self.cache.hits - seen[0], self.cache.misses - seen[1]
        self.stats.peak_rss = peak_rss()
        return self.stats

    def _projected(self, items, src, tgt, shared: Similarity) -> dict[int, tuple]:
        """The (up, down) of every LoRA on the module from stacked products (project_group),
        when the torch backend projects and the gate lets the module through; else {} (each
        job projects alone, and gets the same bits). A failure here falls back to that too, so
        that only the LoRA at fault fails."""
        if self.opts.method == "copy" or min(shared.sims["phi_left"], shared.sims["phi_right"]) < self.opts.tau:
            return {}
        live = [(i, job) for i, (task, job) in enumerate(items) if task.error is None and not job.widths_differ]
        try:
            got = project_group([_factors(job, src) for _, job in live], src.U, src.V, tgt.U, tgt.V,
                                self.opts.method, cross=shared.cross)
        except Exception:
            return {}
        return {i: p for (i, _), p in zip(live, got)}

    def _apply(self, module: str, items, src, tgt, on_done, project=None, spill: Spill | None = None) -> None:
        shared = None  # the module's similarity, formed once for all the LoRAs on it
        projected: dict[int, tuple] = {}
        for n, (task, job) in enumerate(items):
            if task.error is not None:
                continue
            try:
                if shared is None and src is not None and not job.widths_differ:
                    shared = similarity(src, tgt, (job.shape[0], math.prod(job.shape[1:])))
                    if project is project_lora.backends["torch"].fn:
                        projected = self._projected(items, src, tgt, shared)
                res = run_job(job, src, tgt, self.opts, project, shared, projected.pop(n, None))
                if spill is not None and len(task.results) + 1 < len(task.plan.jobs):
                    try:  # a result completing its task is used at once
                        res.park(spill, self.opts, task.lora.dtype)
                    except OSError as e:  # the spill lies beside the outputs: a full disk there
                        raise _CannotPark(f"{task.output or 'spill file'}: cannot write: {e.strerror or e}") from e
                task.results.append(res)
            except _CannotPark as e:
                task.error = str(e)
            except Exception as e:  # one LoRA's failure must not stop the others
                task.error = f"{job.lora_key}: {type(e).__name__}: {e}"
            if task.done:
                on_done(task)
        if self.progress:
            self.progress(1)
