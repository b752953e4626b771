"""`prolora extract`: a LoRA of W_tuned - W_base, the best rank-r (or energy-chosen)
approximation of each layer's difference, from two checkpoints streamed layer by layer.

The math per layer (difference.py): dW = W_tuned - W_base in float32, its top-r singular
triplets from the truncated_svd op (randomized where r is small relative to the layer, else
exact), factors up = U sqrt(S), down = sqrt(S) V^T. The factors are written with one alpha for
every module (--rank, else the most common rank; a module of another rank r has its up scaled by
r / alpha), so every reader applies up @ down = the approximation (factors.uniform_alpha). Identical
layers are skipped and reported, as are layers the output format has no name for.

The pass runs on the engine's parts: the planner chunks the layers in model order so that a
chunk's differences take at most a quarter of the budget (planner.difference_chunks), the loader
reads the next chunk in a background thread while the current one is computed
(loader.read_ahead), and the memory governor gives the budget and trims the heap near it, so the
peak resident memory follows `max_memory`, not the checkpoints' size. Same-shape layers of a chunk
go to the SVD as one batch. With several tuned checkpoints (`extract_many`, `--tuned-dir`) each
base layer is read once for all of them.

The metadata naming the base model is the family's (Family.lora_metadata; a generic default for a
family without one). Outputs are written atomically when all their layers are done; nothing is
written on error.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from ..checkpoints import BaseModel
from ..engine.loader import read_ahead, read_weight
from ..engine.memory import budget as run_budget, check_fits, peak_rss, trim_near
from ..engine.planner import difference_bytes, difference_chunks, raw_itemsize
from ..errors import InputFileError, LoraMismatchError, ModelError, NothingTransferredError, OptionError, \
    OutputPathError, ProloraError
from ..families import of as family_of, open_model
from ..formats import write_lora
from ..lora import LoraFile
from ..plan import format_spelling, out_key
from ..version import __version__
from .difference import Layer, Target, compute_chunk
from .extract_spec import BACKENDS, BatchExtractResult, ExtractOptions, ExtractResult, LayerExtract
from .factors import uniform_alpha

__all__ = ["BACKENDS", "BatchExtractResult", "ExtractOptions", "ExtractResult", "LayerExtract", "check_pair",
           "extract", "extract_many", "select_layers", "tuned_files"]

MAIN_COMPONENTS = ("unet", "transformer")
# text-encoder layers extracted with --text-encoders: CLIP attention and MLP linears, what kohya's
# networks adapt (a LoRA on text_projection does not load in diffusers / transformers)
TEXT_LAYERS = re.compile(r"\.(self_attn|mlp)\.")
Progress = Callable[[int, str], Callable[[int], None]]


# ----------------------------------------------------------------------------- selection


def _is_big_conv(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def select_layers(base: BaseModel, opts: ExtractOptions) -> list[Layer]:
    """The layers of `base` the options ask for, in model order, each with its output key."""
    pattern = re.compile(opts.layers) if opts.layers else None
    spelling = format_spelling(opts.format, base)
    out: list[Layer] = []
    for module, ref in base.weights.items():
        component = module.partition(".")[0]
        if component not in MAIN_COMPONENTS and not (opts.text_encoders and TEXT_LAYERS.search(module)):
            continue
        if pattern is not None and not pattern.search(module):
            continue
        shape = tuple(ref.shape)
        big_conv = _is_big_conv(shape)
        cap = opts.conv_rank if big_conv else opts.rank
        layer = Layer(module, shape, None, cap)
        if big_conv and opts.conv_rank is None:
            layer.skip, layer.reason = "conv-skipped", "3x3 conv: pass --conv-rank N to extract it"
        else:
            key, why = out_key(base, module, spelling)
            layer.key = key
            if key is None:
                layer.skip, layer.reason = "unspellable", why or ""
        out.append(layer)
    if not out:
        raise OptionError(f"no layer of {base.name} matches" + (f" --layers {opts.layers!r}" if opts.layers else "")
                          + ("" if opts.text_encoders else " (the text encoders need --text-encoders)"))
    return out


def check_pair(base: BaseModel, tuned: BaseModel, layers: list[Layer]) -> None:
    """Refuse a TUNED of another family or with other layer shapes, before anything is read."""
    if base.family != tuned.family:
        raise ModelError(f"{tuned.path}: is a {tuned.family} model but BASE {base.path} is {base.family}; "
                         "extract needs a fine-tune of BASE")
    missing = [x.module for x in layers if x.module not in tuned.weights]
    if missing:
        raise LoraMismatchError(f"{tuned.path}: has no layer '{missing[0]}' of BASE ({len(missing)} missing); "
                                "is it a fine-tune of BASE?")
    for x in layers:
        got = tuple(tuned.weights[x.module].shape)
        if got != x.shape:
            raise LoraMismatchError(f"{tuned.path}: layer '{x.module}' has shape {got}, BASE has {x.shape}; "
                                    "is it a fine-tune of BASE?")


# ----------------------------------------------------------------------------- the outputs


def base_metadata(model: BaseModel) -> dict[str, str]:
    """What a LoRA extracted from `model` says of its base: the family's lora_metadata, else the
    generic entries (the member's name as architecture and base version, diffusers, 1024x1024)."""
    fam = family_of(model)
    if fam is not None and fam.lora_metadata is not None:
        return fam.lora_metadata(model)
    return {"modelspec.architecture": model.family, "modelspec.implementation": "diffusers",
            "modelspec.resolution": "1024x1024", "ss_base_model_version": model.family, "ss_v2": "False"}


def _metadata(base: BaseModel, target: Target, opts: ExtractOptions) -> dict[str, str]:
    """kohya's ss_* (kohya format) and modelspec entries, plus prolora's provenance."""
    of_base = base_metadata(base)
    md = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{of_base['modelspec.architecture']}/lora",
        "modelspec.implementation": of_base["modelspec.implementation"],
        "modelspec.title": target.output.stem,
        "modelspec.resolution": of_base["modelspec.resolution"],
        "modelspec.date": datetime.date.today().isoformat(),
        "prolora.job": "extract",
        "prolora.version": __version__,
        "prolora.base": base.name,
        "prolora.base_id": base.identity(),
        "prolora.tuned": target.model.name,
        "prolora.tuned_id": target.model.identity(),
        "prolora.extract": json.dumps(opts.spec()),
    }
    if opts.format == "kohya":
        dim = str(opts.rank) if opts.rank is not None else "Dynamic"
        md.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": dim,
            "ss_network_alpha": dim if opts.rank is None else str(float(opts.rank)),
            "ss_base_model_version": of_base["ss_base_model_version"],
            "ss_v2": of_base["ss_v2"],
            "ss_sd_model_name": base.name,
            "ss_new_sd_model_name": target.model.name,
            "ss_training_comment": f"extracted with prolora {__version__} (not trained)",
        })
        if opts.conv_rank is not None:
            md["ss_network_args"] = json.dumps({"conv_dim": str(opts.conv_rank), "conv_alpha": str(opts.conv_rank)})
    return md


def _output_path(output: Path, tuned: Path, inputs: list[Path]) -> Path:
    if output.is_dir():
        output = output / f"{tuned.stem if tuned.suffix else tuned.name}-lora.safetensors"
    for p in inputs:
        if output.exists() and output.resolve() == p.resolve():
            raise OutputPathError(f"{output}: is an input; refusing to overwrite it, choose another output")
    if not output.parent.is_dir():
        raise OutputPathError(f"{output}: its folder {output.parent} does not exist")
    return output


# ----------------------------------------------------------------------------- the pass


def _read_chunk(base: BaseModel, targets: list[Target], chunk: list[Layer]) -> dict:
    """Runs in the loader's thread: {module: (base raw, [tuned raw per target])} for the layers of a
    chunk to compute, each a matrix in its stored dtype."""
    return {x.module: (read_weight(base, x.module), [read_weight(t.model, x.module) for t in targets])
            for x in chunk if not x.skip}


def _run(base_path, tuned: list[tuple[Path, Path]], opts: ExtractOptions, progress: Progress | None,
         failed: dict[str, str] | None) -> list[ExtractResult]:
    """Extract every (tuned, output) against base in one pass over the layers. A tuned
    checkpoint that fails validation goes to `failed` when given (else raises)."""
    t0 = time.perf_counter()
    with ExitStack() as stack:
        base = base_path if isinstance(base_path, BaseModel) else stack.enter_context(open_model(base_path))
        layers = select_layers(base, opts)
        targets: list[Target] = []
        for tpath, out in tuned:
            try:
                model = stack.enter_context(open_model(tpath))
                check_pair(base, model, layers)
                targets.append(Target(Path(tpath), model, out))
            except ProloraError as e:
                if failed is None:
                    raise
                failed[str(tpath)] = str(e)
        if not targets:
            return []
        itemsizes = raw_itemsize(base) + raw_itemsize(targets[0].model) * len(targets)
        budget = run_budget(opts.max_memory or None)
        chunks = difference_chunks(layers, lambda x: difference_bytes(x.shape, itemsizes), budget)
        check_fits(max((difference_bytes(x.shape, itemsizes) for x in layers if not x.skip), default=0), budget)
        step = progress(len(layers), "extract") if progress else None
        with read_ahead(chunks, lambda chunk: _read_chunk(base, targets, chunk)) as reads:
            for chunk, data in reads:
                compute_chunk(chunk, data, targets, opts)
                del data
                trim_near(budget)
                if step:
                    step(len(chunk))
        results = []
        order = {x.module: i for i, x in enumerate(layers)}
        for t in targets:
            t.lines.sort(key=lambda line: order[line.module])  # model order (chunks batch by shape)
            if not t.modules:
                raise NothingTransferredError(f"{t.path}: no layer differs from BASE enough to extract "
                                              f"({len(t.lines)} layers looked at); nothing written")
        for t in targets:
            lora = LoraFile(format=opts.format, modules=uniform_alpha(t.modules, opts.rank),
                            metadata=_metadata(base, t, opts), dtype=opts.save_dtype)
            write_lora(t.output, lora, opts.format)
            results.append(ExtractResult(t.output, lora, base.name, t.model.name, opts, t.lines,
                                         time.perf_counter() - t0, peak_rss()))
        return results


def _write_report(path, reports: list[dict]) -> None:
    from ..safetensors_io import atomic_path

    body = reports[0] if len(reports) == 1 else {"job": "extract", "results": reports}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(body, indent=2))


def extract(base: str | os.PathLike | BaseModel, tuned: str | os.PathLike, output: str | os.PathLike,
            options: ExtractOptions | None = None, progress: Progress | None = None,
            report: str | os.PathLike | None = None, **kw) -> ExtractResult:
    """Extract a LoRA of `tuned` - `base` into `output` (a file, or an existing folder).
    Options as an ExtractOptions or keywords (rank=64, energy=0.9, conv_rank=..., ...)."""
    opts = options or ExtractOptions(**kw)
    tuned = Path(tuned)
    if not tuned.exists():
        raise InputFileError(f"{tuned}: no such file or folder")
    base_p = base.path if isinstance(base, BaseModel) else Path(base)
    out = _output_path(Path(output), tuned, [base_p, tuned])
    (res,) = _run(base, [(tuned, out)], opts, progress, None)
    if report is not None:
        _write_report(report, [res.report()])
    return res


def tuned_files(folder: str | os.PathLike) -> list[Path]:
    """The checkpoints in a folder: .safetensors files and diffusers / component folders."""
    d = Path(folder)
    if not d.is_dir():
        raise InputFileError(f"{d}: not a folder")
    found = sorted(p for p in d.iterdir() if (p.is_file() and p.suffix == ".safetensors") or
                   (p.is_dir() and ((p / "model_index.json").is_file() or (p / "config.json").is_file())))
    if not found:
        raise InputFileError(f"{d}: no .safetensors checkpoint or diffusers folder in it")
    return found


def extract_many(base: str | os.PathLike | BaseModel, tuned_dir: str | os.PathLike, output: str | os.PathLike,
                 options: ExtractOptions | None = None, progress: Progress | None = None,
                 report: str | os.PathLike | None = None, **kw) -> BatchExtractResult:
    """Extract a LoRA from every checkpoint in `tuned_dir` against `base`, reading each base layer
    once; outputs go to the folder `output` (created if missing) as `<name>-lora.safetensors`.
    A checkpoint that is not a fine-tune of base is reported in `failed`; the others complete."""
    opts = options or ExtractOptions(**kw)
    files = tuned_files(tuned_dir)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out}: --tuned-dir writes one LoRA per checkpoint; -o must be a folder")
    out.mkdir(parents=True, exist_ok=True)
    base_p = base.path if isinstance(base, BaseModel) else Path(base)
    pairs = [(f, _output_path(out, f, [base_p] + files)) for f in files]
    failed: dict[str, str] = {}
    results = _run(base, pairs, opts, progress, failed)
    if report is not None:
        _write_report(report, [r.report() for r in results] + [{"tuned": k, "failed": v} for k, v in failed.items()])
    return BatchExtractResult(results, failed)
