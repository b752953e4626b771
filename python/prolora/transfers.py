"""Running transfers: one LoRA or a batch through plan -> engine -> finished file, in passes under
the memory budget, each output written as soon as its last layer is done. The public entry
points are re-exported by prolora.api."""
from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from . import families
from .version import __version__
from .cache import BasisCache
from .checkpoints import BaseModel
from .compat import pad_text_encoders
from .engine import (
    BasisProvider,
    Engine,
    EngineStats,
    LoraTask,
    current_rss,
    default_budget,
    finalize,
    lora_passes,
)
from .errors import NothingTransferredError, OptionError, OutputPathError, ProloraError
from .families import model_of, pad_output
from .formats import read_lora, write_lora
from .formats.adapters import drop_bias_deltas
from .formats.parts import assemble_parts
from .lora import LoraFile
from .matching import block_mapping, depths_differ, match_blocks
from .options import TransferOptions
from .outputs import resolve_output
from .plan import build_plan, check_families
from .report import LayerRecord, Report
from .tensor_files import quantization, quantization_warnings

PathLike = str | os.PathLike
Progress = Callable[[int], None]
# a progress factory: called with (total, description), returns the per-step callback
ProgressFactory = Callable[[int, str], Progress]


@dataclass
class TransferResult:
    lora: LoraFile | None  # the transferred LoRA, in the output format and spelling (None in a batch: see output)
    report: Report
    output: Path | None  # where it was written (None when not asked to write)


def _provenance(lf: LoraFile, source: BaseModel, target: BaseModel, opts: TransferOptions,
                report: Report) -> dict[str, str]:
    meta = dict(lf.metadata)
    s = report.summary()
    meta.update({f"prolora.{k}": v for k, v in opts.describe().items()})
    meta.update({
        "prolora.version": __version__,
        "prolora.source": source.name,
        "prolora.source_id": source.identity(),
        "prolora.target": target.name,
        "prolora.target_id": target.identity(),
        "prolora.transferred": f"{s['transferred']}/{s['layers']}",
    })
    if "ss_sd_model_name" in meta:
        meta["ss_sd_model_name"] = target.name
    if any(r.adapter for r in report.layers):
        meta["prolora.convert_error"] = f"{opts.convert_error:g}"
    return meta


@dataclass
class Failure:
    """A LoRA of a batch that could not be transferred, and why."""

    lora: str
    error: str
    exception: BaseException | None = None


@dataclass
class BatchResult:
    results: list[TransferResult]
    failures: list[Failure]
    stats: EngineStats


def make_options(options: TransferOptions | None, kwargs: dict[str, Any]) -> TransferOptions:
    if options is not None and kwargs:
        raise OptionError("pass either options= or option keywords, not both")
    return options or TransferOptions(**kwargs)


def _cache(opts: TransferOptions) -> BasisCache | None:
    return BasisCache(opts.cache_dir) if opts.cache else None


def _report(task: LoraTask, src: BaseModel, tgt: BaseModel, opts: TransferOptions, seconds: float) -> Report:
    lf, plan = task.lora, task.plan
    records = [r.record() for r in task.results]
    records += [LayerRecord(s.module, s.lora_key, None, s.shape, False, s.reason, rank_in=lf.modules[s.lora_key].rank)
                for s in plan.skipped]
    report = Report(records, warnings=list(plan.warnings))
    quant = {role: q for role, q in (("source", quantization(src)), ("target", quantization(tgt))) if q}
    report.warnings += quantization_warnings(src, "source") + quantization_warnings(tgt, "target")
    report.info = {
        "source": src.name, "source_id": src.identity(), "target": tgt.name, "target_id": tgt.identity(),
        **{f"{role}_quantization": q for role, q in quant.items()},
        "lora": str(lf.path) if lf.path else None, "input_format": lf.format, "output_format": plan.out_format,
        **opts.describe(), "device": opts.device, "seconds": round(seconds, 3),
    }
    return report


def _complete(task: LoraTask, src: BaseModel, tgt: BaseModel, opts: TransferOptions, t0: float) -> TransferResult:
    """A finished task -> output LoRA (alpha convention, loader padding, provenance), written."""
    lf, fmt = task.lora, task.plan.out_format
    report = _report(task, src, tgt, opts, time.perf_counter() - t0)
    modules = assemble_parts(finalize(task.results, opts, lf.dtype))  # fused slices back into one module
    report.warnings += drop_bias_deltas(modules, fmt)
    if modules:
        report.warnings += pad_text_encoders(modules, fmt, tgt)
        report.warnings += pad_output(modules, fmt, tgt)
    out = LoraFile(fmt, modules, _provenance(lf, src, tgt, opts, report), lf.dtype)
    if opts.refine is not None and modules:  # --refine: train the transferred factors on the target
        from .refine import refine_lora

        out, stats = refine_lora(src, tgt, lf, out, opts.refine, opts.device, opts.max_gpu_memory)
        report.info["refine"] = stats.asdict()
    if task.output is not None:
        if not modules:
            raise NothingTransferredError(
                f"no layer of {lf.path or 'the LoRA'} passed the similarity gate (min phi "
                f"{report.summary()['min_phi']:.3f} < tau {opts.tau:g}); nothing written. Lower --tau or "
                "pass --skipped copy")
        write_lora(task.output, out, fmt)
        out.path = task.output
    return TransferResult(out, report, task.output)


def _run(source, target, items: list[tuple[Any, Path | None]], opts: TransferOptions,
         progress: ProgressFactory | None, strict: bool,
         on_result: Callable[[TransferResult | Failure], None] | None = None) -> BatchResult:
    """Plan every LoRA, run them in passes over the models (as many LoRAs per pass as the memory
    budget holds: usually one pass), write each when complete.
    strict: raise the first failure (single transfers); else collect failures (batches)."""
    t0 = time.perf_counter()
    results: list[TransferResult] = []
    failures: list[Failure] = []

    def fail(name: str, e: BaseException) -> None:
        if strict:
            raise e
        msg = str(e) if isinstance(e, ProloraError) else f"{type(e).__name__}: {e}"
        f = Failure(name, msg if name in msg else f"{name}: {msg}", e)
        failures.append(f)
        if on_result:
            on_result(f)

    with ExitStack() as stack:
        src, tgt = model_of(source, stack), model_of(target, stack)
        check_families(src, tgt, opts.widths)  # before any similarity work
        if opts.refine is not None:  # --refine's refusals (no text encoder, no stated context) before any work
            from .refine.conditioning import preflight

            preflight(opts.refine, (src, tgt))
        cache = _cache(opts)
        mapping, matches = matching_for(src, tgt, opts, cache)

        def on_done(task: LoraTask) -> None:
            name = str(task.lora.path or "LoRA")
            if task.error is not None:
                return fail(name, ProloraError(f"{name}: {task.error}"))
            try:
                res = _complete(task, src, tgt, opts, t0)
            except ProloraError as e:
                return fail(name, e)
            except OSError as e:  # e.g. disk full while writing: this LoRA fails, nothing half-written
                return fail(name, ProloraError(f"{task.output}: cannot write: {e.strerror or e}"))
            if not strict and res.output is not None:
                res.lora = None  # written: a batch of hundreds must not keep every output in memory
            results.append(res)
            if on_result:
                on_result(res)

        budget = opts.max_memory or default_budget()
        passes = lora_passes([_resident_bytes(lora) for lora, _ in items], budget - current_rss())
        stats = EngineStats()
        for i, group in enumerate(passes):
            tasks: list[LoraTask] = []
            for lora, out in (items[j] for j in group):
                name = str(lora.path if isinstance(lora, LoraFile) else lora)
                try:
                    lf = lora if isinstance(lora, LoraFile) else read_lora(lora, opts.conversion())
                    fmt = lf.format if opts.format == "same" else opts.format
                    plan = build_plan(lf, src, tgt, fmt, mapping, opts.widths)
                    if matches:
                        plan.warnings.append(f"{len(matches)} target transformer blocks matched to source blocks "
                                             "by subspace similarity (see info.matching)")
                    if len(passes) > 1 and cache is None:
                        plan.warnings.append(f"the batch ran in {len(passes)} passes under the memory budget and "
                                             "without a basis cache, so every pass computed the bases again")
                    tasks.append(LoraTask(lf, plan, out))
                except ProloraError as e:
                    fail(name, e)
            modules = {j.module for t in tasks for j in t.plan.jobs}
            what = "layers" if len(passes) == 1 else f"layers, pass {i + 1}/{len(passes)}"
            step = progress(len(modules), what) if progress else None
            stats.add(Engine(src, tgt, opts, cache, step).run(tasks, on_done))
            del tasks
        stats.matching = [asdict(m) for m in matches]
    return BatchResult(results, failures, stats)


def _resident_bytes(lora: Any) -> int:
    """What reading a LoRA of the batch adds to resident memory: its file size (a LoraFile the
    caller passed is resident already)."""
    if isinstance(lora, LoraFile):
        return 0
    try:
        return os.stat(lora).st_size
    except OSError:
        return 0  # reading it will fail and say why


def matching_for(src: BaseModel, tgt: BaseModel, opts: TransferOptions, cache: BasisCache | None):
    """(source module -> target module, block matches) when layers are matched by similarity."""
    mode = opts.match
    fam = families.of(src) or families.of(tgt)
    block_of = fam.block_of if fam is not None else None
    if mode == "auto":
        mode = "similarity" if depths_differ(src.weights, tgt.weights, block_of) else "name"
    if mode == "name":
        return None, []
    provider = BasisProvider(src, tgt, opts, cache)
    matches = match_blocks(src.weights, tgt.weights, provider.basis_of, block_of)
    return block_mapping(src.weights, tgt.weights, matches, block_of), matches


def transfer(source: PathLike | BaseModel, target: PathLike | BaseModel | Any, lora: PathLike | LoraFile,
             output: PathLike | None = None, options: TransferOptions | None = None, *,
             overwrite: bool = False, progress: ProgressFactory | None = None,
             **option_kwargs: Any) -> TransferResult:
    """Move `lora` (trained on `source`) onto `target`; write it to `output` if given.

    Options come as a TransferOptions or as its fields by keyword (method="prolora", tau=0.8...).
    `target` may also be held in memory: a diffusers pipeline, a UNet2DConditionModel /
    FluxTransformer2DModel / QwenImageTransformer2DModel / WanTransformer3DModel (or text
    encoder), or (state_dict, config); its weights are read from the modules where they live
    (checkpoints.memory). A Wan 2.2 pipeline holding both experts is no single target: pass one
    expert, or use prolora.diffusers.load_lora, which transfers onto each.
    """
    opts = make_options(options, option_kwargs)
    out_path = resolve_output(output, lora, [source, target, lora], overwrite) if output is not None else None
    batch = _run(source, target, [(lora, out_path)], opts, progress, strict=True)
    res = batch.results[0]
    res.report.info["engine"] = asdict(batch.stats)
    if batch.stats.matching:
        res.report.info["matching"] = batch.stats.matching
    return res


def transfer_many(source: PathLike | BaseModel, target: PathLike | BaseModel, loras: list[PathLike | LoraFile],
                  output_dir: PathLike, options: TransferOptions | None = None, *, overwrite: bool = False,
                  progress: ProgressFactory | None = None,
                  on_result: Callable[[TransferResult | Failure], None] | None = None,
                  **option_kwargs: Any) -> BatchResult:
    """Transfer many LoRAs in one pass over the base models into `output_dir` (same file names).

    Each output is written as soon as its last layer is done; a LoRA that fails is reported in
    `failures` (and to `on_result`) and does not stop the others.
    """
    opts = make_options(options, option_kwargs)
    out_dir = Path(output_dir)
    if not out_dir.is_dir():
        raise OutputPathError(f"{out_dir}: output folder does not exist")
    seen: set[str] = set()

    def output_of(lora: Any) -> Path | None:
        name = Path(lora.path).name if isinstance(lora, LoraFile) and lora.path else Path(str(lora)).name
        if name in seen:
            raise OutputPathError(f"{lora}: another LoRA of the batch has the file name {name}")
        seen.add(name)
        return resolve_output(out_dir / name, lora, [source, target, *loras], overwrite)

    return run_batch(source, target, loras, output_of, opts, progress, on_result)


def run_batch(source: Any, target: Any, loras: list, output_of: Callable[[Any], Path | None],
              opts: TransferOptions, progress: Any = None,
              on_result: Callable[[TransferResult | Failure], None] | None = None) -> BatchResult:
    """One pass over the models for many LoRAs, each written to `output_of(lora)`. A LoRA whose
    output cannot be resolved (a ProloraError) becomes a Failure up front, reported to
    `on_result` like the others, and does not stop the batch."""
    items: list[tuple[Any, Path | None]] = []
    pre_failures: list[Failure] = []
    for lora in loras:
        try:
            items.append((lora, output_of(lora)))
        except ProloraError as e:
            pre_failures.append(Failure(str(lora), str(e), e))
            if on_result:
                on_result(pre_failures[-1])
    batch = _run(source, target, items, opts, progress, strict=False, on_result=on_result)
    batch.failures[:0] = pre_failures
    return batch


