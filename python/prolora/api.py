"""The public surface: transfer(), transfer_many(), transfer_files(), similarity(), compare(),
inspect(), build_cache(). The work happens in transfers.py (transfers), subspaces.py (similarity,
the basis cache) and experts.py (targets of two experts); this module joins them for callers."""
from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .agreement import Agreement, compare_modules
from .checkpoints import BaseModel
from .errors import InputFileError, LoraMismatchError, OptionError
from .experts import experts_of, transfer_experts, transfer_experts_many
from .families import model_of, open_model
from .formats import read_lora, summarize
from .formats.adapters import refuse_base_dependent
from .formats.parts import canonical_modules
from .lora import LoraFile
from .options import TransferOptions
from .outputs import (
    check_output_path,
    lora_files,
    resolve_output,
    resolve_report_path,
    write_checked,
)
from .subspaces import SimilarityResult, build_cache, similarity
from .tensor_files import quantization, read_header
from .transfers import (
    BatchResult,
    Failure,
    ProgressFactory,
    TransferResult,
    make_options,
    run_batch,
    transfer,
    transfer_many,
)

PathLike = str | os.PathLike
_write = write_checked

__all__ = ["BatchResult", "CompareResult", "Failure", "SimilarityResult", "TransferOptions", "TransferResult",
           "build_cache", "check_output_path", "compare", "inspect", "lora_files", "make_options",
           "resolve_output", "resolve_report_path", "run_batch", "similarity", "transfer", "transfer_files",
           "transfer_many"]


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
            write_checked(report, res.report.write_json)
        if plot:
            from .plot import transfer_heatmap

            title = f"{res.report.info['source']} -> {res.report.info['target']}: {Path(loras[0]).name}"
            write_checked(plot, lambda p: transfer_heatmap(res.report, p, tau=options.tau, title=title))
        return res
    out_dir = Path(output)
    if out_dir.suffix == ".safetensors":
        raise OptionError(f"{out_dir}: several LoRAs need an output folder, not a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = transfer_many(source, target, loras, out_dir, options, overwrite=overwrite, progress=progress,
                          on_result=on_result)
    if report:
        from .report import write_batch_json

        write_checked(report, lambda p: write_batch_json(p, batch))
    return batch


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
            model = model_of(base, stack)

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
    return any(any(m in k.lower() for m in marks) for k in read_header(path).tensors)


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
