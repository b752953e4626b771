"""`prolora merge`: a weighted sum of LoRAs, dW = sum_i w_i * dW_i per module, recompressed to a
rank through the factors (never a dense m x n matrix).

Per module the weighted factors are concatenated, up = [w_1 s_1 up_1, ..., w_n s_n up_n] and
down = [down_1; ...; down_n] (s_i the module's alpha / rank), so that up @ down is the weighted
sum exactly; its SVD comes from the factors (method.factor_svd: QR of each side, SVD of the small
core) and the best rank-N approximation is kept. Where N is at least the summed rank (or
not given), the concatenated factors are written as they are: exact. Merged modules carry one
alpha (--rank, else the most common rank; factors.uniform_alpha).

Modules are matched by name when every LoRA is in one format; with `base`, through the model
(as `compare` does), so the LoRAs may be in different formats and spellings, fused Flux modules
being cut into their q/k/v/mlp slices and written back as the output format spells them.
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..version import __version__
from ..checkpoints import BaseModel
from ..families import open_model
from ..errors import LoraMismatchError, ModelError, OptionError, OutputPathError
from ..formats import read_lora, write_lora
from ..formats.adapters import refuse_base_dependent
from ..formats.parts import canonical_modules
from ..lora import FORMATS, LoraFile, LoraModule
from ..method import factor_svd
from ..plan import format_spelling, out_key
from .factors import EXACT, uniform_alpha


@dataclass
class ModuleMerge:
    """One merged module: which inputs touched it, their summed rank, the rank written and the
    fraction of the merged dW's energy kept."""

    key: str
    inputs: list[int]
    summed_rank: int
    new_rank: int
    retained_energy: float


@dataclass
class MergeResult:
    output: Path
    lora: LoraFile
    ratios: list[float]
    modules: list[ModuleMerge] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why it is not in the output

    def summary(self) -> dict:
        return {"modules": len(self.modules), "skipped": len(self.skipped), "ratios": self.ratios,
                "rank_max": max((m.new_rank for m in self.modules), default=0),
                "mean_retained_energy": sum(m.retained_energy for m in self.modules) / max(1, len(self.modules))}

    def report(self) -> dict:
        return {"job": "merge", "output": str(self.output), "summary": self.summary(),
                "modules": [asdict(m) for m in self.modules], "skipped": self.skipped}


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def merge_modules(parts: list[tuple[float, LoraModule]], rank: int | None, key: str,
                  dtype: torch.dtype, svd: str | None = EXACT) -> tuple[LoraModule, int, float]:
    """(merged module, summed rank, retained energy) of sum_i w_i * dW_i for `parts` (w_i, module);
    recompressed in float64, the core's SVD on the small_svd backend `svd` (None: dispatched)."""
    first = parts[0][1]
    shapes = {(m.out_features, tuple(m.down.shape[1:])) for _, m in parts}
    if len(shapes) != 1:
        raise LoraMismatchError(f"module '{key}': the LoRAs disagree on its shape ({sorted(shapes)}); are they for "
                                "the same base model?")
    ups = torch.cat([_flat(m.up).double() * (w * m.scale) for w, m in parts], dim=1)
    downs = torch.cat([_flat(m.down).double() for _, m in parts], dim=0)
    total = int(downs.shape[0])
    if rank is None or rank >= total:
        up, down, k, kept = ups, downs, total, 1.0
    else:
        f = factor_svd(ups, downs, svd)
        k = max(1, min(rank, int(f.S.numel())))
        up, down = f.split(k)
        kept = f.retained(k)
    if first.is_conv:
        up = up.reshape(up.shape[0], k, 1, 1)
        down = down.reshape((k,) + tuple(first.down.shape[1:]))
    bias = None
    if any(m.bias is not None for _, m in parts):
        bias = sum(w * m.bias.double() for w, m in parts if m.bias is not None).to(dtype)
    # alpha = rank (scale 1) spelled out, so that a PEFT file carries it in its adapter metadata
    return LoraModule(key, down.to(dtype).contiguous(), up.to(dtype).contiguous(), float(k), bias), total, kept


def merge(loras: list[str | os.PathLike | LoraFile], output: str | os.PathLike, ratios: list[float] | None = None,
          rank: int | None = None, base: str | os.PathLike | BaseModel | None = None, format: str | None = None,
          dtype: torch.dtype | None = None, report: str | os.PathLike | None = None) -> MergeResult:
    """Merge `loras` with weights `ratios` (default 1 each) into one LoRA of rank at most `rank`
    (None: the summed rank, exact), written atomically to `output` in `format` (default: the
    first LoRA's). `base` matches modules through that model (needed when the formats differ)."""
    if not loras:
        raise OptionError("merge needs at least one LoRA")
    files = [x if isinstance(x, LoraFile) else read_lora(x) for x in loras]
    for f in files:
        refuse_base_dependent(f, "merge")
    ratios = [1.0] * len(files) if ratios is None else [float(r) for r in ratios]
    if len(ratios) != len(files):
        raise OptionError(f"{len(ratios)} ratios for {len(files)} LoRAs; give one ratio per LoRA")
    if rank is not None and rank < 1:
        raise OptionError(f"--rank {rank}: expected a positive integer")
    fmt = format or files[0].format
    if fmt not in FORMATS:
        raise OptionError(f"unknown LoRA format '{fmt}'; choose one of {', '.join(FORMATS)}")
    output = Path(output)
    for f in files:
        if f.path is not None and output.exists() and output.resolve() == Path(f.path).resolve():
            raise OutputPathError(f"{output}: is an input LoRA; refusing to overwrite an input, choose another output")
    out_dtype = dtype or files[0].dtype

    groups: dict[str, list[tuple[int, float, LoraModule]]] = {}
    skipped: dict[str, str] = {}
    names: dict[str, str] = {}  # group id -> output key
    with ExitStack() as stack:
        if base is None:
            formats = {f.format for f in files}
            if len(formats) > 1:
                raise OptionError(f"the LoRAs are in different formats ({', '.join(sorted(formats))}): pass --base MODEL "
                                  "so that their modules can be matched")
            if fmt != files[0].format:
                raise OptionError("--format needs --base MODEL (module names are spelled through the model)")
            for i, f in enumerate(files):
                for key, m in f.modules.items():
                    groups.setdefault(key, []).append((i, ratios[i], m))
                    names[key] = key
        else:
            model = base if isinstance(base, BaseModel) else stack.enter_context(open_model(base))
            for i, f in enumerate(files):
                canon = canonical_modules(f.modules, model)
                unknown = [k for k in canon if k not in model.weights]
                if unknown:
                    raise LoraMismatchError(f"{f.path}: {len(unknown)} module(s) the base {model.name} ({model.family}) "
                                            f"does not have, e.g. '{unknown[0]}'; is the LoRA for another model?")
                for module, m in canon.items():
                    groups.setdefault(module, []).append((i, ratios[i], m))
            spelling = format_spelling(fmt, model)
            for module in list(groups):
                key, why = out_key(model, module, spelling)
                if key is None:
                    skipped[module] = why
                    del groups[module]
                else:
                    names[module] = key
        if not groups:
            raise LoraMismatchError("the LoRAs have no module that can be written in the output format")
        modules: dict[str, LoraModule] = {}
        lines: list[ModuleMerge] = []
        for gid, parts in groups.items():
            key = names[gid]
            merged, total, kept = merge_modules([(w, m) for _, w, m in parts], rank, key, out_dtype)
            if key in modules:
                raise ModelError(f"two modules would be written as '{key}'")
            modules[key] = merged
            lines.append(ModuleMerge(key, [i for i, _, _ in parts], total, merged.rank, kept))

    md = {k: v for k, v in files[0].metadata.items() if fmt == files[0].format}
    md.update({"prolora.job": "merge", "prolora.version": __version__,
               "prolora.merge": json.dumps({"inputs": [Path(f.path).name if f.path else None for f in files],
                                            "ratios": ratios, "rank": rank})})
    out = LoraFile(format=fmt, modules=uniform_alpha(modules, rank), metadata=md, dtype=out_dtype)
    write_lora(output, out, fmt)
    res = MergeResult(output, out, ratios, lines, skipped)
    if report is not None:
        from ..safetensors_io import atomic_path

        with atomic_path(report) as tmp:
            Path(tmp).write_text(json.dumps(res.report(), indent=2))
    return res


@dataclass
class MergeIntoResult:
    """A checkpoint with LoRAs merged in: its path and which weights changed."""

    output: Path
    changed: dict[str, float]  # canonical module -> ||dW||_F / ||W||_F
    skipped: dict[str, str]


def merge_into(loras: list[str | os.PathLike | LoraFile], into: str | os.PathLike, output: str | os.PathLike,
               ratios: list[float] | None = None, rank: int | None = None) -> MergeIntoResult:
    """Write a copy of the single-file checkpoint `into` with sum_i w_i dW_i (recompressed to
    `rank` if given) added to its weights, tensor by tensor with the streaming writer (never the
    whole model in memory; atomic: nothing is left at `output` on error). Modules are matched
    through `into`, so the LoRAs may be in any format."""
    from ..safetensors_io import SafetensorsFile, StreamingWriter

    files = [x if isinstance(x, LoraFile) else read_lora(x) for x in loras]
    for f in files:
        refuse_base_dependent(f, "merge --into")
    ratios = [1.0] * len(files) if ratios is None else [float(r) for r in ratios]
    if len(ratios) != len(files):
        raise OptionError(f"{len(ratios)} ratios for {len(files)} LoRAs; give one ratio per LoRA")
    into, output = Path(into), Path(output)
    if not into.is_file():
        raise OptionError(f"--into {into}: merging into a checkpoint needs a single .safetensors file")
    if output.exists() and output.resolve() in {into.resolve(), *(Path(f.path).resolve() for f in files if f.path)}:
        raise OutputPathError(f"{output}: is an input; refusing to overwrite it, choose another output")
    with open_model(into) as model:
        groups: dict[str, list[tuple[float, LoraModule]]] = {}
        for w, f in zip(ratios, files):
            for module, m in canonical_modules(f.modules, model).items():
                if module not in model.weights:
                    raise LoraMismatchError(f"{f.path}: module '{module}' is not a weight of {into.name} "
                                            f"({model.family}); is the LoRA for another model?")
                groups.setdefault(module, []).append((w, m))
        by_key: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for module, parts in groups.items():
            merged, _, _ = merge_modules(parts, rank, module, torch.float64)
            ref = model.weights[module]
            dw = (merged.scale * (_flat(merged.up) @ _flat(merged.down))).reshape(ref.shape)
            if tuple(dw.shape) != tuple(ref.shape):
                raise LoraMismatchError(f"module '{module}': dW {tuple(dw.shape)} does not fit the weight {ref.shape}")
            if ref.file.resolve() != into.resolve():
                raise OptionError(f"--into {into}: weight '{module}' lies in another file")
            by_key.setdefault(ref.key, []).append((module, dw))
        changed: dict[str, float] = {}
        with SafetensorsFile(into) as f:
            entries = [(name, _torch_dtype(f.info(name).dtype), f.info(name).shape) for name in f.keys()]
            md = {**f.metadata, "prolora.job": "merge-into", "prolora.version": __version__,
                  "prolora.merge": json.dumps({"inputs": [Path(x.path).name if x.path else None for x in files],
                                               "ratios": ratios, "rank": rank})}
            with StreamingWriter(output, entries, md) as out:
                for name, dtype, _ in entries:
                    t = f.get(name)
                    hits = by_key.get(name)
                    if hits:
                        w = t.double()
                        norm = max(float(w.norm()), 1e-30)
                        for module, dw in hits:
                            ref = model.weights[module]
                            if ref.transposed:
                                dw = dw.T
                            if ref.pieces or ref.rows:
                                at = 0
                                for a, b in (ref.pieces or (ref.rows,)):
                                    w[a:b] += dw[at:at + b - a]
                                    at += b - a
                            else:
                                w += dw
                            changed[module] = float(dw.norm()) / norm
                        t = w.to(dtype)
                    out.write(name, t.contiguous())
    return MergeIntoResult(output, changed, {})


def _torch_dtype(name: str) -> torch.dtype:
    table = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    if name not in table:
        raise ModelError(f"tensor dtype {name} is not supported for --into")
    return table[name]
