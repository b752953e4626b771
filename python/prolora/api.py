"""The public surface: transfer(), similarity(), inspect()."""
from __future__ import annotations

import os
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .checkpoints import BaseModel, open_model
from .compat import pad_text_encoders
from .engine import BasisSource, finalize, record, run_plan
from .errors import InputFileError, NothingTransferredError, OptionError, OutputPathError
from .formats import read_lora, summarize, write_lora
from .lora import LoraFile
from .method import KMode, similarity as layer_similarity
from .options import TransferOptions
from .plan import build_plan
from .report import LayerRecord, Report
from .safetensors_io import read_header

PathLike = str | os.PathLike
Progress = Callable[[int], None]
# a progress factory: called with (total, description), returns the per-step callback
ProgressFactory = Callable[[int, str], Progress]


@dataclass
class TransferResult:
    lora: LoraFile  # the transferred LoRA, in the output format and spelling
    report: Report
    output: Path | None  # where it was written (None when not asked to write)


@dataclass
class SimilarityResult:
    report: Report


def _model(x: PathLike | BaseModel, stack: ExitStack) -> BaseModel:
    return x if isinstance(x, BaseModel) else stack.enter_context(open_model(x))


def _paths_of(x: Any) -> list[Path]:
    if isinstance(x, BaseModel):
        return [Path(x.path)]
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
    return meta


def transfer(source: PathLike | BaseModel, target: PathLike | BaseModel, lora: PathLike | LoraFile,
             output: PathLike | None = None, options: TransferOptions | None = None, *,
             overwrite: bool = False, progress: ProgressFactory | None = None,
             **option_kwargs: Any) -> TransferResult:
    """Move `lora` (trained on `source`) onto `target`; write it to `output` if given.

    Options come as a TransferOptions or as its fields by keyword (method="prolora", tau=0.8...).
    """
    if options is not None and option_kwargs:
        raise OptionError("pass either options= or option keywords, not both")
    opts = options or TransferOptions(**option_kwargs)
    out_path = resolve_output(output, lora, [source, target, lora], overwrite) if output is not None else None
    t0 = time.perf_counter()
    lf = lora if isinstance(lora, LoraFile) else read_lora(lora)
    out_format = lf.format if opts.format == "same" else opts.format
    with ExitStack() as stack:
        src, tgt = _model(source, stack), _model(target, stack)
        plan = build_plan(lf, src, tgt, out_format)
        step = progress(len(plan.jobs), "transfer") if progress else None
        results = run_plan(plan, src, tgt, opts, lf.dtype, step)
        records = [record(r) for r in results]
        records += [LayerRecord(s.module, s.lora_key, None, s.shape, False, s.reason, rank_in=lf.modules[s.lora_key].rank)
                    for s in plan.skipped]
        report = Report(records, warnings=plan.warnings)
        report.info = {
            "source": src.name, "source_id": src.identity(), "target": tgt.name,
            "target_id": tgt.identity(), "lora": str(lf.path) if lf.path else None,
            "input_format": lf.format, "output_format": out_format, **opts.describe(),
            "compute_dtype": str(opts.compute_dtype).removeprefix("torch."), "device": opts.device,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        modules = finalize(results, opts, lf.dtype)
        if modules:
            report.warnings += pad_text_encoders(modules, out_format, tgt)
        out = LoraFile(out_format, modules, _provenance(lf, src, tgt, opts, report), lf.dtype)
    if not modules and out_path is not None:
        raise NothingTransferredError(
            f"no layer of {lf.path or 'the LoRA'} passed the similarity gate (min phi {report.summary()['min_phi']}"
            f" < tau {opts.tau:g}); nothing written. Lower --tau or pass --skipped copy")
    if out_path is not None:
        write_lora(out_path, out, out_format)
        out.path = out_path
    report.info["seconds"] = round(time.perf_counter() - t0, 3)
    return TransferResult(out, report, out_path)


def similarity(source: PathLike | BaseModel, target: PathLike | BaseModel, *,
               subspace: KMode | str = "energy:0.9", tau: float = 0.8, layers: str | None = None,
               compute_dtype: torch.dtype = torch.float64, device: str = "cpu",
               backends: dict[str, str] | None = None, progress: ProgressFactory | None = None) -> SimilarityResult:
    """Per-layer subspace similarity (phi) of every weight the two models share by name and shape.

    `layers` is a regular expression on canonical module names (e.g. 'attn|ff') to limit the work.
    """
    opts = TransferOptions(subspace=subspace, tau=tau, compute_dtype=compute_dtype, device=device,
                           backends=backends or {})
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
        S, T = BasisSource(src, opts), BasisSource(tgt, opts)
        step = progress(len(names), "similarity") if progress else None
        records = []
        for m in names:
            t1 = time.perf_counter()
            shape = src.weights[m].shape
            dims = (shape[0], int(torch.Size(shape[1:]).numel()))
            sb = S.basis(m)
            k = opts.subspace.choose(min(dims), sb.S, sb.energy)
            sims = layer_similarity(sb.truncate(k), T.basis(m, k), dims)
            ok = min(sims["phi_left"], sims["phi_right"]) >= tau
            records.append(LayerRecord(m, m, m, shape, ok, "above tau" if ok else "below tau", k=k,
                                       gap=sb.truncate(k).gap(), seconds=round(time.perf_counter() - t1, 6),
                                       **sims))
            if step:
                step(1)
        info = {"source": src.name, "source_id": src.identity(), "target": tgt.name,
                "target_id": tgt.identity(), "subspace": str(opts.subspace), "tau": tau,
                "seconds": round(time.perf_counter() - t0, 3)}
    return SimilarityResult(Report(records, info))


def _looks_like_lora(path: Path) -> bool:
    suffixes = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", "_lora.down.weight",
                ".lora_linear_layer.down.weight", ".hada_w1_a", ".lokr_w1", "dora_scale")
    return any(k.endswith(suffixes) or ".hada_" in k or ".lokr_" in k for k in read_header(path).tensors)


def inspect(path: PathLike) -> dict[str, Any]:
    """What a file or folder is: a LoRA (format, family, modules, ranks...) or a base model."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p}: no such file or folder")
    if p.is_file() and _looks_like_lora(p):
        return {"kind": "lora", "path": str(p), **summarize(read_lora(p))}
    with open_model(p) as m:
        return {"kind": "model", "path": str(p), **m.describe()}
