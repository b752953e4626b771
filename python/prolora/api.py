"""The public surface: transfer(), similarity(), inspect()."""
from __future__ import annotations

import math
import os
import re
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .cache import BasisCache
from .checkpoints import BaseModel
from .checkpoints.memory import LAYOUT as MEMORY_LAYOUT
from . import families
from .families import in_memory_model, is_in_memory, open_model, pad_output
from .agreement import Agreement, compare_modules
from .compat import pad_text_encoders
from .engine import (BasisProvider, Engine, EngineStats, LoraTask, current_rss, default_budget, finalize,
                     lora_passes)
from .errors import (InputFileError, LoraMismatchError, NothingTransferredError, OptionError,
                     OutputPathError, ProloraError)
from .formats import read_lora, summarize, write_lora
from .formats.adapters import drop_bias_deltas, refuse_base_dependent
from .formats.parts import assemble_parts, canonical_modules
from .lora import LoraFile
from .matching import block_mapping, depths_differ, match_blocks
from .method import KMode, similarities as layer_similarities
from .ops import subspace_phi
from .ops.registry import override_for
from .options import TransferOptions
from .plan import build_plan, check_families
from .report import LayerRecord, Report
from .tensor_files import quantization, quantization_warnings, read_header as read_any_header

PathLike = str | os.PathLike
Progress = Callable[[int], None]
# a progress factory: called with (total, description), returns the per-step callback
ProgressFactory = Callable[[int, str], Progress]


@dataclass
class TransferResult:
    lora: LoraFile | None  # the transferred LoRA, in the output format and spelling (None in a batch: see output)
    report: Report
    output: Path | None  # where it was written (None when not asked to write)


@dataclass
class SimilarityResult:
    report: Report


def _model(x: PathLike | BaseModel | Any, stack: ExitStack) -> BaseModel:
    """A BaseModel for a path, a BaseModel, or weights held in memory (a diffusers pipeline, a
    model module, (state_dict, config): checkpoints.memory)."""
    if isinstance(x, BaseModel):
        return x
    if is_in_memory(x):
        return in_memory_model(x)
    return stack.enter_context(open_model(x))


def _paths_of(x: Any) -> list[Path]:
    if isinstance(x, BaseModel):
        return [] if x.layout == MEMORY_LAYOUT else [Path(x.path)]
    if is_in_memory(x):
        return []
    if isinstance(x, LoraFile):
        return [Path(x.path)] if x.path else []
    return [Path(x)]


def check_output_path(out: Path, inputs: list[Any], *, overwrite: bool, suffix: str | None = None) -> Path:
    """Refuse an output that is (or is inside and would replace a file of) an input, that exists
    without `overwrite`, or whose folder is missing or read-only."""
    if suffix and out.suffix.lower() != suffix:
        raise OutputPathError(f"{out}: output must be a {suffix} file")
    for src in (p for x in inputs for p in _paths_of(x)):
        if out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise OutputPathError(f"{out}: output would overwrite an input; choose another path")
        if src.is_dir() and src.resolve() in out.resolve().parents and out.exists():
            raise OutputPathError(f"{out}: output would overwrite a file of input model {src}")
    if out.is_dir():
        raise OutputPathError(f"{out}: is a folder")
    if out.exists() and not overwrite:
        raise OutputPathError(f"{out}: already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise OutputPathError(f"{out.parent}: output folder does not exist")
    if not os.access(out.parent, os.W_OK):
        raise OutputPathError(f"{out.parent}: output folder is not writable")
    return out


def resolve_output(output: PathLike, lora: PathLike | LoraFile, inputs: list[Any], overwrite: bool) -> Path:
    """The LoRA output path (a folder means: the LoRA's file name inside it), validated before any work."""
    out = Path(output)
    if out.is_dir():
        name = (Path(lora.path).name if lora.path else "transferred.safetensors") if isinstance(lora, LoraFile) \
            else Path(lora).name
        out = out / name
    return check_output_path(out, inputs, overwrite=overwrite, suffix=".safetensors")


def resolve_report_path(path: PathLike, inputs: list[Any]) -> Path:
    """A report/figure path: never an input; replacing an earlier report is fine."""
    return check_output_path(Path(path), inputs, overwrite=True)


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


def _options(options: TransferOptions | None, kwargs: dict[str, Any]) -> TransferOptions:
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
        src, tgt = _model(source, stack), _model(target, stack)
        check_families(src, tgt, opts.widths)  # before any similarity work
        cache = _cache(opts)
        mapping, matches = _matching(src, tgt, opts, cache)

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


def _matching(src: BaseModel, tgt: BaseModel, opts: TransferOptions, cache: BasisCache | None):
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
    opts = _options(options, option_kwargs)
    out_path = resolve_output(output, lora, [source, target, lora], overwrite) if output is not None else None
    batch = _run(source, target, [(lora, out_path)], opts, progress, strict=True)
    res = batch.results[0]
    res.report.info["engine"] = asdict(batch.stats)
    if batch.stats.matching:
        res.report.info["matching"] = batch.stats.matching
    return res


def lora_files(folder: PathLike) -> list[Path]:
    """The .safetensors files directly inside `folder`, sorted."""
    d = Path(folder)
    if not d.is_dir():
        raise InputFileError(f"{d}: not a folder")
    return sorted(p for p in d.iterdir() if p.suffix == ".safetensors" and p.is_file())


def transfer_many(source: PathLike | BaseModel, target: PathLike | BaseModel, loras: list[PathLike | LoraFile],
                  output_dir: PathLike, options: TransferOptions | None = None, *, overwrite: bool = False,
                  progress: ProgressFactory | None = None,
                  on_result: Callable[[TransferResult | Failure], None] | None = None,
                  **option_kwargs: Any) -> BatchResult:
    """Transfer many LoRAs in one pass over the base models into `output_dir` (same file names).

    Each output is written as soon as its last layer is done; a LoRA that fails is reported in
    `failures` (and to `on_result`) and does not stop the others.
    """
    opts = _options(options, option_kwargs)
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


def transfer_files(source: PathLike, target: PathLike, loras: list[PathLike], output: PathLike,
                   options: TransferOptions, *, lora_dir: PathLike | None = None, report: PathLike | None = None,
                   plot: PathLike | None = None, overwrite: bool = False, progress: ProgressFactory | None = None,
                   on_result: Callable[[TransferResult | Failure], None] | None = None,
                   target_2: PathLike | None = None) -> TransferResult | BatchResult | Any:
    """What `prolora transfer` does, from file names to written files: one LoRA to `output` (a
    file or a folder), or many (also every LoRA in `lora_dir`) into the folder `output`, created
    if missing; then the report JSON and the heatmap when asked. Returns the TransferResult of
    one LoRA, or the BatchResult of many. A target of two experts (a Wan 2.2 A14B folder, or
    `target_2`) gets one output per expert: experts.ExpertsResult."""
    loras = list(loras) + (lora_files(lora_dir) if lora_dir else [])
    if not loras:
        raise OptionError("no LoRA given: name LoRA files or --lora-dir DIR")
    from .experts import experts_of, transfer_experts, transfer_experts_many

    experts = experts_of(target, target_2)
    if experts is not None:
        if plot:
            raise OptionError("--plot takes one target; a target of two experts has two")
        if len(loras) == 1 and lora_dir is None:
            return transfer_experts(source, experts, loras[0], output, options, report=report, overwrite=overwrite,
                                    progress=progress)
        return transfer_experts_many(source, experts, loras, output, options, report=report, overwrite=overwrite,
                                     progress=progress, on_result=on_result)
    for path in filter(None, (report, plot)):
        resolve_report_path(path, [source, target, *loras])
    if len(loras) == 1 and lora_dir is None:
        res = transfer(source, target, loras[0], output, options, overwrite=overwrite, progress=progress)
        if report:
            _write(report, res.report.write_json)
        if plot:
            from .plot import transfer_heatmap

            title = f"{res.report.info['source']} -> {res.report.info['target']}: {Path(loras[0]).name}"
            _write(plot, lambda p: transfer_heatmap(res.report, p, tau=options.tau, title=title))
        return res
    out_dir = Path(output)
    if out_dir.suffix == ".safetensors":
        raise OptionError(f"{out_dir}: several LoRAs need an output folder, not a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = transfer_many(source, target, loras, out_dir, options, overwrite=overwrite, progress=progress,
                          on_result=on_result)
    if report:
        from .report import write_batch_json

        _write(report, lambda p: write_batch_json(p, batch))
    return batch


def _write(path: PathLike, write: Callable[[PathLike], None]) -> None:
    """write(path); an OS error (a full disk, ...) becomes a one-line error naming the file."""
    try:
        write(path)
    except OSError as e:
        raise OutputPathError(f"{path}: cannot write: {e.strerror or e}") from None


def similarity(source: PathLike | BaseModel, target: PathLike | BaseModel, *,
               subspace: KMode | str = "energy:0.9", tau: float = 0.8, layers: str | None = None,
               device: str = "cpu", backends: dict[str, str] | None = None, cache: bool = True,
               cache_dir: str | None = None, max_memory: int | str | None = None,
               progress: ProgressFactory | None = None) -> SimilarityResult:
    """Per-layer subspace similarity (phi) of every weight the two models share by name and shape.

    `layers` is a regular expression on canonical module names (e.g. 'attn|ff') to limit the work.
    """
    opts = TransferOptions(subspace=subspace, tau=tau, device=device, backends=backends or {}, cache=cache,
                           cache_dir=cache_dir, max_memory=max_memory)
    try:
        pattern = re.compile(layers) if layers else None
    except re.error as e:
        raise OptionError(f"--layers {layers!r}: not a regular expression ({e})") from None
    t0 = time.perf_counter()
    with ExitStack() as stack:
        src, tgt = _model(source, stack), _model(target, stack)
        names = [m for m, w in src.weights.items()
                 if (pattern is None or pattern.search(m)) and m in tgt.weights and tgt.weights[m].shape == w.shape]
        if not names:
            raise InputFileError(f"{src.name} and {tgt.name} share no weights"
                                 + (f" matching {layers!r}" if layers else ""))
        engine = Engine(src, tgt, opts, _cache(opts))
        provider = BasisProvider(src, tgt, opts, engine.cache)
        step = progress(len(names), "similarity") if progress else None
        records = []
        override = override_for(subspace_phi, opts.backends)
        for chunk in engine.chunks(names):
            bases = provider.bases(provider.loader.prefetch(chunk))
            flat = {m: (src.weights[m].shape[0], math.prod(src.weights[m].shape[1:])) for m in chunk}
            sims = layer_similarities(bases, flat, override)
            for m in chunk:
                ok = min(sims[m]["phi_left"], sims[m]["phi_right"]) >= tau
                records.append(LayerRecord(m, m, m, src.weights[m].shape, ok, "above tau" if ok else "below tau",
                                           k=bases[m][0].k, gap=bases[m][0].gap(), **sims[m]))
            if step:
                step(len(chunk))
        info = {"source": src.name, "source_id": src.identity(), "target": tgt.name,
                "target_id": tgt.identity(), "subspace": str(opts.subspace), "tau": tau,
                "backend": ",".join(sorted(provider.backends)), "seconds": round(time.perf_counter() - t0, 3)}
    return SimilarityResult(Report(records, info))


def build_cache(model: PathLike | BaseModel, *, layers: str | None = None, subspace: str = "energy:0.9",
                backends: dict[str, str] | None = None, device: str = "cpu", max_memory: int | str | None = None,
                cache_dir: str | None = None, progress: ProgressFactory | None = None) -> int:
    """Compute and store the bases of a model's layers (those matching `layers`); returns how many."""
    opts = TransferOptions(subspace=subspace, backends=backends or {}, device=device, max_memory=max_memory,
                           cache_dir=cache_dir)
    pattern = re.compile(layers) if layers else None
    with ExitStack() as stack:
        m = _model(model, stack)
        names = [n for n in m.weights if pattern is None or pattern.search(n)]
        engine = Engine(m, m, opts, BasisCache(cache_dir))
        provider = BasisProvider(m, m, opts, engine.cache)
        step = progress(len(names), "cache") if progress else None
        for chunk in engine.chunks(names):
            provider.bases(provider.loader.prefetch(chunk))
            if step:
                step(len(chunk))
    return len(names)


@dataclass
class CompareResult:
    agreement: Agreement
    names: dict[str, str]  # "a"/"b" -> file


def compare(lora_a: PathLike | LoraFile, lora_b: PathLike | LoraFile, base: PathLike | BaseModel | None = None) -> CompareResult:
    """Per-layer and overall agreement of two LoRAs for the same base (e.g. a transfer against a
    LoRA trained on the target). With `base`, module names are matched through the model, so the
    two files may be in different formats; without it they must spell modules alike."""
    a = lora_a if isinstance(lora_a, LoraFile) else read_lora(lora_a)
    b = lora_b if isinstance(lora_b, LoraFile) else read_lora(lora_b)
    for lf in (a, b):
        refuse_base_dependent(lf, "compare")
    if base is None:
        if a.format != b.format:
            raise OptionError(f"the LoRAs are in different formats ({a.format} vs {b.format}): pass --base MODEL "
                              "so their module names can be matched")
        ma, mb = a.modules, b.modules
    else:
        with ExitStack() as stack:
            model = _model(base, stack)

            # canonical ids; fused modules (Flux qkv, linear1) cut into their slices
            ma, mb = canonical_modules(a.modules, model), canonical_modules(b.modules, model)
    try:
        agreement = compare_modules(ma, mb)
    except ValueError as e:
        raise LoraMismatchError(f"{a.path} vs {b.path}: {e}") from None
    if not agreement.layers:
        raise LoraMismatchError(f"{a.path} and {b.path} share no module"
                                + ("" if base else "; pass --base MODEL to match names across spellings"))
    return CompareResult(agreement, {"a": str(a.path), "b": str(b.path)})


def _looks_like_lora(path: Path) -> bool:
    """Adapter files name their tensors lora/hada/lokr/oft/dora; base checkpoints never do."""
    marks = ("lora", "hada_", "lokr_", "oft_", "dora_scale", "lora_magnitude")
    return any(any(m in k.lower() for m in marks) for k in read_any_header(path).tensors)


def inspect(path: PathLike) -> dict[str, Any]:
    """What a file or folder is: a LoRA (format, family, modules, ranks...) or a base model."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p}: no such file or folder")
    if p.is_file() and _looks_like_lora(p):
        return {"kind": "lora", "path": str(p), **summarize(read_lora(p))}
    with open_model(p) as m:
        q = quantization(m)
        return {"kind": "model", "path": str(p), **m.describe(), **({"quantization": q} if q else {})}
