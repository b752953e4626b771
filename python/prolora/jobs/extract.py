"""`prolora extract`: a LoRA of W_tuned - W_base, the best rank-r (or energy-chosen)
approximation of each layer's difference, from two checkpoints streamed layer by layer.

Per layer dW = W_tuned - W_base (float32 from the stored dtype); its top-r singular triplets come
from the truncated_svd op: the randomized backend (ops/svd_randomized.py) where r is small
relative to the layer (its accuracy contract: Frobenius error within 1% of optimal), else an
exact SVD. The factors are split as up = U sqrt(S), down = sqrt(S) V^T (balanced for float16)
and written with one alpha for every module (--rank, else the most common rank; a module of
another rank r has its up scaled by r / alpha), so every reader applies up @ down = the
approximation (see factors.uniform_alpha for why one alpha).
What sd-scripts offers is here too, reimplemented from its meaning: `clamp_quantile` clamps the
factors' values at that quantile of their absolute values, `min_diff` skips layers whose largest
|dW| is below it. Identical layers are skipped and reported, as are layers the output format has
no name for.

Memory: layers are read in model order in chunks of at most a quarter of the budget (the next
chunk is read in a background thread while the current one is computed), so the peak resident
memory follows `max_memory`, not the checkpoints' size. Same-shape layers of a chunk go to the
SVD as one batch. With several tuned checkpoints (`extract_many`, `--tuned-dir`) each base layer
is read once for all of them.

Outputs are written atomically when all their layers are done; nothing is written on error.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..version import __version__
from ..checkpoints import BaseModel
from ..families import open_model
from ..engine.memory import default_budget, peak_rss, trim_near
from ..engine.planner import consecutive
from ..errors import (InputFileError, LoraMismatchError, ModelError, NothingTransferredError, OptionError,
                      OutputPathError, ProloraError)
from ..formats import write_lora
from ..lora import FORMATS, LoraFile, LoraModule
from ..ops.registry import Problem
from ..ops.svd import truncated_svd
from ..ops.svd_randomized import NAME as RANDOMIZED, check as randomized_check
from .factors import uniform_alpha
from ..plan import format_spelling, out_key

MAIN_COMPONENTS = ("unet", "transformer")
# text-encoder layers extracted with --text-encoders: CLIP attention and MLP linears, what kohya's
# networks adapt (a LoRA on text_projection does not load in diffusers / transformers)
TEXT_LAYERS = re.compile(r"\.(self_attn|mlp)\.")
BACKENDS = ("auto", "randomized", "exact")
Progress = Callable[[int, str], Callable[[int], None]]


@dataclass
class ExtractOptions:
    """What decides an extraction's result.

    rank: the rank of every linear / 1x1-conv layer; or energy: the smallest rank keeping that
    fraction of each layer's ||dW||_F^2 (one of the two). conv_rank: 3x3 convs are extracted at
    this rank (None: skipped). clamp_quantile: None (the exact approximation) or Q in (0, 1].
    min_diff: layers whose largest |dW| is below it are skipped. layers: a regex searched in the
    canonical module names. text_encoders: also the text encoders' attention and MLP linears. backend: auto (randomized where
    eligible, else exact), randomized, or exact. max_memory: bytes or '2GB' (None: the engine's
    default budget).
    """

    rank: int | None = None
    energy: float | None = None
    conv_rank: int | None = None
    clamp_quantile: float | None = None
    min_diff: float = 0.0
    layers: str | None = None
    text_encoders: bool = False
    format: str = "kohya"
    save_dtype: torch.dtype = torch.float16
    backend: str = "auto"
    max_memory: int | str | None = None

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise OptionError("extract needs one of --rank N and --energy F")
        if self.rank is not None and self.rank < 1:
            raise OptionError(f"--rank {self.rank}: expected a positive integer")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise OptionError(f"--energy {self.energy}: expected a fraction in (0, 1]")
        if self.conv_rank is not None and self.conv_rank < 1:
            raise OptionError(f"--conv-rank {self.conv_rank}: expected a positive integer")
        if self.clamp_quantile is not None and not 0 < self.clamp_quantile <= 1:
            raise OptionError(f"--clamp-quantile {self.clamp_quantile}: expected a number in (0, 1]")
        if not self.min_diff >= 0:
            raise OptionError(f"--min-diff {self.min_diff}: expected a number >= 0")
        if self.format not in FORMATS:
            raise OptionError(f"unknown LoRA format '{self.format}'; choose one of {', '.join(FORMATS)}")
        if self.backend not in BACKENDS:
            raise OptionError(f"unknown extract backend '{self.backend}'; choose one of {', '.join(BACKENDS)}")
        if self.backend == RANDOMIZED and self.energy is not None:
            raise OptionError("--energy needs each layer's whole spectrum: use --backend exact or auto")
        if self.layers is not None:
            try:
                re.compile(self.layers)
            except re.error as e:
                raise OptionError(f"--layers {self.layers!r}: not a regular expression ({e})") from None
        if isinstance(self.max_memory, str):
            from ..options import parse_size

            self.max_memory = parse_size(self.max_memory)

    def spec(self) -> dict:
        d = asdict(self)
        d["save_dtype"] = str(self.save_dtype).removeprefix("torch.")
        return d


@dataclass
class LayerExtract:
    """One layer's outcome. status: extracted, identical, below-min-diff, conv-skipped, unspellable.
    error: ||dW - written||_F / ||dW||_F (for extracted layers)."""

    module: str
    key: str | None
    shape: tuple[int, ...]
    status: str
    rank: int = 0
    max_abs_diff: float = 0.0
    retained_energy: float = 0.0
    error: float = 0.0
    backend: str = ""
    reason: str = ""


@dataclass
class ExtractResult:
    """One extracted LoRA: where it went, the LoRA itself and the per-layer report."""

    output: Path
    lora: LoraFile | None
    base: str
    tuned: str
    options: ExtractOptions
    layers: list[LayerExtract] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss: int = 0

    def summary(self) -> dict:
        ext = [x for x in self.layers if x.status == "extracted"]
        count = {s: sum(1 for x in self.layers if x.status == s)
                 for s in ("identical", "below-min-diff", "conv-skipped", "unspellable")}
        return {"extracted": len(ext), "identical": count["identical"], "below_min_diff": count["below-min-diff"],
                "conv_skipped": count["conv-skipped"], "unspellable": count["unspellable"],
                "rank_min": min((x.rank for x in ext), default=0), "rank_max": max((x.rank for x in ext), default=0),
                "mean_retained_energy": sum(x.retained_energy for x in ext) / max(1, len(ext)),
                "max_error": max((x.error for x in ext), default=0.0),
                "backends": sorted({x.backend for x in ext}), "seconds": self.seconds, "peak_rss": self.peak_rss}

    def report(self) -> dict:
        return {"job": "extract", "output": str(self.output), "base": self.base, "tuned": self.tuned,
                "options": self.options.spec(), "summary": self.summary(),
                "layers": [asdict(x) for x in self.layers]}


@dataclass
class BatchExtractResult:
    results: list[ExtractResult]
    failed: dict[str, str]  # tuned path -> one-line error


# ----------------------------------------------------------------------------- selection


@dataclass
class _Layer:
    module: str
    shape: tuple[int, ...]
    key: str | None
    k_cap: int | None  # the fixed rank (or the energy rule's cap) of this layer
    skip: str | None = None  # status when skipped before reading
    reason: str = ""

    @property
    def flat(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    def raw_bytes(self, itemsizes: int) -> int:
        m, n = self.flat
        return m * n * (itemsizes + 8)  # both raw weights, the float32 difference and its batched copy


def _is_big_conv(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def select_layers(base: BaseModel, opts: ExtractOptions) -> list[_Layer]:
    """The layers of `base` the options ask for, in model order, each with its output key."""
    pattern = re.compile(opts.layers) if opts.layers else None
    spelling = format_spelling(opts.format, base)
    out: list[_Layer] = []
    for module, ref in base.weights.items():
        component = module.partition(".")[0]
        if component not in MAIN_COMPONENTS and not (opts.text_encoders and TEXT_LAYERS.search(module)):
            continue
        if pattern is not None and not pattern.search(module):
            continue
        shape = tuple(ref.shape)
        big_conv = _is_big_conv(shape)
        cap = opts.conv_rank if big_conv else opts.rank
        layer = _Layer(module, shape, None, cap)
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


def check_pair(base: BaseModel, tuned: BaseModel, layers: list[_Layer]) -> None:
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


# ----------------------------------------------------------------------------- the math


def _k_spec(layer: _Layer, opts: ExtractOptions):
    if opts.energy is None:
        return layer.k_cap
    f, cap = opts.energy, layer.k_cap

    def choose(S: torch.Tensor, energy: float) -> int:
        if energy <= 0:
            return 1
        frac = (S.double() ** 2).cumsum(0) / energy
        hit = torch.nonzero(frac >= f - 1e-12).flatten()
        k = int(hit[0]) + 1 if hit.numel() else int(S.numel())
        return max(1, min(k, cap) if cap is not None else k)

    return choose


def _svd(D: torch.Tensor, ks: list, opts: ExtractOptions) -> tuple[list, str]:
    """Top-k bases of a batch D (b, m, n) of same-shape differences, and the backend's name."""
    m, n = D.shape[-2:]
    fixed = all(isinstance(k, int) for k in ks)
    kmax = max(ks) if fixed else None
    problem = Problem(device=D.device.type, dtype="float32", shape=(m, n), batch=D.shape[0], k=kmax)
    if opts.backend == RANDOMIZED:
        name = RANDOMIZED
        fn = truncated_svd.backends[RANDOMIZED].fn  # forced: also where dispatch would call it too small
    else:
        name = RANDOMIZED if opts.backend == "auto" and fixed and randomized_check(problem) is None else "svd"
        fn = truncated_svd.choose(problem, override=name).backend.fn
    return fn(D, ks), name


def _clamp(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp both factors' values to +-(the q quantile of the absolute values of both)."""
    flat = torch.cat([up.reshape(-1), down.reshape(-1)]).abs()
    idx = max(1, min(flat.numel(), math.ceil(q * flat.numel())))
    hi = float(torch.kthvalue(flat.float(), idx).values)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def _factors(layer: _Layer, basis, D: torch.Tensor, opts: ExtractOptions) -> tuple[LoraModule, float, float]:
    """(module, retained energy, relative error) of one layer's basis."""
    k = basis.k
    S = basis.S[:k].double()
    energy = basis.energy
    kept_energy = float((S ** 2).sum())
    s = S.sqrt().to(basis.U.dtype)
    up = basis.U * s
    down = (basis.V * s).T
    if opts.clamp_quantile is not None and opts.clamp_quantile < 1:
        up, down = _clamp(up, down, opts.clamp_quantile)
        err = float((D.double() - up.double() @ down.double()).norm() / math.sqrt(energy)) if energy > 0 else 0.0
    else:  # U_k^T D = S_k V_k^T for every backend here, so the error follows from the energies
        err = math.sqrt(max(0.0, energy - kept_energy) / energy) if energy > 0 else 0.0
    kept = kept_energy / energy if energy > 0 else 1.0
    if len(layer.shape) == 4:
        down = down.reshape((k,) + tuple(layer.shape[1:]))
        up = up.reshape(layer.shape[0], k, 1, 1)
    # alpha = rank (scale 1) spelled out: a PEFT file then carries it in lora_adapter_metadata, without
    # which diffusers would scale a module of another rank than the file's most common one
    mod = LoraModule(layer.key, down.to(opts.save_dtype).contiguous(), up.to(opts.save_dtype).contiguous(), float(k))
    return mod, min(1.0, kept), err


# ----------------------------------------------------------------------------- the pass


def _itemsize(model: BaseModel) -> int:
    sizes = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "float16": 2, "bfloat16": 2, "float32": 4}
    return max((sizes.get(r.dtype, 4) for r in model.weights.values()), default=4)


def _budget(opts: ExtractOptions) -> int:
    return int(opts.max_memory) if opts.max_memory else default_budget()


@dataclass
class _Target:
    """One tuned checkpoint in flight: its model, output path and what has been computed."""

    path: Path
    model: BaseModel
    output: Path
    modules: dict[str, LoraModule] = field(default_factory=dict)
    lines: list[LayerExtract] = field(default_factory=list)


def _read_chunk(base: BaseModel, targets: list[_Target], chunk: list[_Layer]):
    """{module: (base raw, [tuned raw per target])} for the layers of a chunk to compute."""
    out = {}
    for x in chunk:
        if x.skip:
            continue
        out[x.module] = (base.load(x.module, dtype=None), [t.model.load(x.module, dtype=None) for t in targets])
    return out


# rows of a difference formed at a time: ~1 MiB of float32, so that forming it, its largest
# entry and its copy into the SVD's batch are one pass over memory, not four
_BLOCK_ELEMENTS = 1 << 18


def _difference(wt: torch.Tensor, wb: torch.Tensor, out: torch.Tensor) -> float:
    """out (float32, m x n) <- wt - wb, computed in float32 (the inputs in their stored dtype),
    row block by row block; returns max |out| (NaN if any entry is NaN). aminmax, not the
    inf-norm: on this CPU torch's inf-norm is ~20x slower than one min/max pass."""
    m, n = out.shape
    wt, wb = wt.reshape(m, n), wb.reshape(m, n)
    step = max(1, _BLOCK_ELEMENTS // n)
    top = 0.0
    for r in range(0, m, step):
        blk = out[r:r + step]
        blk.copy_(wt[r:r + step])
        blk.sub_(wb[r:r + step])
        lo, hi = (float(v) for v in torch.aminmax(blk))
        if math.isnan(lo) or math.isnan(hi):
            return math.nan
        top = max(top, -lo, hi)
    return top


def _compute_chunk(chunk: list[_Layer], data: dict, targets: list[_Target], opts: ExtractOptions) -> None:
    """Differences of a chunk's layers, their SVDs (same-shape layers batched) and factors."""
    groups: dict[tuple[int, int], list[tuple[_Layer, _Target, torch.Tensor, torch.Tensor]]] = {}
    for x in chunk:
        if x.skip:
            for t in targets:
                t.lines.append(LayerExtract(x.module, x.key, x.shape, x.skip, reason=x.reason))
            continue
        wb, wts = data.pop(x.module)
        for t, wt in zip(targets, wts):
            groups.setdefault(x.flat, []).append((x, t, wt, wb))
    for shape, group in groups.items():
        batch = torch.empty((len(group),) + shape, dtype=torch.float32)  # the differences, in place
        items: list[tuple[_Layer, _Target, float]] = []
        for x, t, wt, wb in group:
            top = _difference(wt, wb, batch[len(items)])
            if top == 0.0:
                t.lines.append(LayerExtract(x.module, x.key, x.shape, "identical"))
            elif not math.isfinite(top):
                raise ModelError(f"{t.path}: layer '{x.module}' differs from BASE by NaN or Inf")
            elif top < opts.min_diff:
                t.lines.append(LayerExtract(x.module, x.key, x.shape, "below-min-diff", max_abs_diff=top,
                                            reason=f"max |dW| {top:.3g} < --min-diff {opts.min_diff:g}"))
            else:
                items.append((x, t, top))
        del group
        if not items:
            continue
        ks = [_k_spec(x, opts) for x, _, _ in items]
        if all(isinstance(k, int) for k in ks):
            ks = [min(k, min(shape)) for k in ks]
        D = batch[:len(items)]
        bases, name = _svd(D, ks, opts)
        for i, ((x, t, top), basis) in enumerate(zip(items, bases)):
            mod, kept, err = _factors(x, basis, D[i], opts)
            t.modules[x.key] = mod
            t.lines.append(LayerExtract(x.module, x.key, x.shape, "extracted", mod.rank, top, kept, err, name))
        del D, batch, bases, items


def _metadata(base: BaseModel, target: _Target, opts: ExtractOptions) -> dict[str, str]:
    """kohya's ss_* (kohya format) and modelspec entries, plus prolora's provenance."""
    fam = base.family
    arch = {"sdxl": "stable-diffusion-xl-v1-base", "ssd-1b": "stable-diffusion-xl-v1-base",
            "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v"}.get(fam)
    if fam == "flux":
        arch = f"flux-1-{getattr(base, 'variant', 'dev')}"
    impl = {"sdxl": "https://github.com/Stability-AI/generative-models", "ssd-1b": "diffusers",
            "flux": "https://github.com/black-forest-labs/flux"}.get(fam, "diffusers")
    res = {"sd1": "512x512", "sd2": "768x768"}.get(fam, "1024x1024")
    md = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch or fam}/lora",
        "modelspec.implementation": impl,
        "modelspec.title": target.output.stem,
        "modelspec.resolution": res,
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
            "ss_base_model_version": {"sdxl": "sdxl_base_v1-0", "ssd-1b": "sdxl_base_v1-0", "sd1": "sd_v1",
                                      "sd2": "sd_v2", "flux": "flux1"}.get(fam, fam),
            "ss_v2": str(fam == "sd2"),
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


def _run(base_path, tuned: list[tuple[Path, Path]], opts: ExtractOptions, progress: Progress | None,
         failed: dict[str, str] | None) -> list[ExtractResult]:
    """Extract every (tuned, output) against base in one pass over the layers. A tuned
    checkpoint that fails validation goes to `failed` when given (else raises)."""
    t0 = time.perf_counter()
    with ExitStack() as stack:
        base = base_path if isinstance(base_path, BaseModel) else stack.enter_context(open_model(base_path))
        layers = select_layers(base, opts)
        targets: list[_Target] = []
        for tpath, out in tuned:
            try:
                model = stack.enter_context(open_model(tpath))
                check_pair(base, model, layers)
                targets.append(_Target(Path(tpath), model, out))
            except ProloraError as e:
                if failed is None:
                    raise
                failed[str(tpath)] = str(e)
        if not targets:
            return []
        itemsizes = _itemsize(base) + _itemsize(targets[0].model) * len(targets)
        budget = _budget(opts)
        chunks = consecutive(layers, lambda x: x.raw_bytes(itemsizes), max(budget // 4, 1))
        biggest = max((x.raw_bytes(itemsizes) for x in layers if not x.skip), default=0)
        if biggest > budget:
            raise OptionError(f"--max-memory {budget / 2**30:.2f} GiB is below what the largest layer needs "
                              f"({biggest / 2**30:.2f} GiB); raise it")
        step = progress(len(layers), "extract") if progress else None
        with ThreadPoolExecutor(1, thread_name_prefix="prolora-extract-read") as pool:
            ahead = pool.submit(_read_chunk, base, targets, chunks[0]) if chunks else None
            for i, chunk in enumerate(chunks):
                data = ahead.result()
                ahead = pool.submit(_read_chunk, base, targets, chunks[i + 1]) if i + 1 < len(chunks) else None
                _compute_chunk(chunk, data, targets, opts)
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
            lora = LoraFile(format=opts.format, modules=uniform_alpha(t.modules, opts.rank), metadata=_metadata(base, t, opts),
                            dtype=opts.save_dtype)
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
