"""Match the modules of a LoRA to source and target weights and decide which layer jobs run.
Reads headers only (through BaseModel); no tensor math beyond shape checks."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .checkpoints import BaseModel
from .errors import InvalidLoraError, LoraMismatchError, ModelError
from .families import check_pair, guess_lora, related
from .families.rules import check_format
from .formats.parts import part_key, split_module
from .lora import LoraFile, LoraModule

# below this share of modules found in the source model, the LoRA is for another model
MIN_MATCH_SHARE = 0.5


@dataclass
class LayerJob:
    """One LoRA module to transfer: where its weights are in the source and the target."""

    lora_key: str
    module: str  # canonical id in the source
    target_module: str  # canonical id in the target
    out_key: str  # module key spelled for the output format
    shape: tuple[int, ...]  # the base weight's shape (out, in) or (out, in, kh, kw)
    lora: LoraModule
    target_shape: tuple[int, ...] | None = None  # set when the target weight has another shape

    @property
    def widths_differ(self) -> bool:
        return self.target_shape is not None and self.target_shape != self.shape


@dataclass
class Skip:
    """A LoRA module that gets no job, and why."""

    lora_key: str
    module: str | None
    shape: tuple[int, ...] | None
    reason: str


@dataclass
class Plan:
    jobs: list[LayerJob]
    skipped: list[Skip]
    out_format: str
    warnings: list[str] = field(default_factory=list)


def format_spelling(out_format: str, model: BaseModel) -> str:
    """The module-name spelling a LoRA file of `out_format` uses for `model`; raises ModelError
    for a format that has no layout for the model's family."""
    check_format(out_format, model)
    return {"kohya": model.kohya_spelling, "peft": "peft", "diffusers-old": "peft",
            "comfy": "comfy", "xlabs": "xlabs"}[out_format]


def _out_spelling(in_format: str, out_format: str, in_spelling: str, target: BaseModel) -> str:
    return in_spelling if out_format == in_format else format_spelling(out_format, target)


# ----------------------------------------------------------------------------- fused-layer hooks
# A LoRA key may adapt a fused weight (Flux: img_attn.qkv, linear1, ...) whose logical slices are
# separate canonical modules; it then becomes one job per slice, and a slice that the output
# format fuses with others is written under a part key (formats.parts). For UNet models every key
# names one module and these hooks change nothing.


def _resolve(source: BaseModel, key: str, lm: LoraModule,
             where: str) -> list[tuple[str, str, LoraModule | None]] | None:
    """(canonical module, spelling, the LoRA's part on it; None: zero there) for every module
    `key` adapts, or None when the source has no such module."""
    hit = source.resolve(key)
    if hit is not None:
        return [(hit[0], hit[1], lm)]
    fused = source.resolve_fused(key)
    if fused is None:
        return None
    if lm.is_conv or lm.out_features != fused.rows:
        raise LoraMismatchError(
            f"{where}: LoRA module '{key}' (up {tuple(lm.up.shape)}) does not fit the fused weight of "
            f"{fused.rows} rows it names in {source.name} ({source.family}); is the LoRA for another model?")
    return [(s.module, fused.spelling, split_module(lm, s.rows)) for s in fused.slices]


def out_key(target: BaseModel, module: str, spelling: str) -> tuple[str | None, str | None]:
    """(output key, None), or (None, why the output format has no name for the module): a slice
    of a fused weight that the format fuses with others gets a part key (formats.parts)."""
    why = target.unspellable(module, spelling)
    if why is not None:
        return None, why
    fused = target.spell_fused(module, spelling)
    if fused is not None:
        key, total, rows = fused
        return part_key(key, rows, total), None
    try:
        return target.spell(module, spelling), None
    except ModelError as e:
        return None, str(e)


def fit_to_weight(lm: LoraModule, shape: tuple[int, ...]) -> LoraModule:
    """A converted adapter (LoHa, LoKr: formats.adapters) whose factors are flattened [k, in*kh*kw]
    shaped as a conv LoRA for the conv weight it adapts; anything else as it is."""
    if len(shape) == 4 and lm.down.dim() == 2 and lm.kind != "lora" and lm.down.shape[1] == math.prod(shape[1:]):
        return dataclasses.replace(lm, down=lm.down.reshape(lm.rank, *shape[1:]),
                                   up=lm.up.reshape(lm.up.shape[0], lm.rank, 1, 1))
    return lm


def _check_fits(lm: LoraModule, shape: tuple[int, ...], where: str, model: BaseModel) -> None:
    """Raise if the LoRA's factors cannot multiply into a weight of this shape."""
    out, rest = shape[0], shape[1:]
    hint = f"; is the LoRA for another model than {model.name} ({model.family})?"
    if lm.is_conv != (len(shape) == 4):
        kind = "conv" if lm.is_conv else "linear"
        raise LoraMismatchError(f"{where}: LoRA module '{lm.key}' is {kind} but the weight has shape {shape}{hint}")
    want_down = tuple(rest) if lm.is_conv else (rest[0],)
    if lm.out_features != out or tuple(lm.down.shape[1:]) != want_down:
        raise LoraMismatchError(
            f"{where}: LoRA module '{lm.key}' (up {tuple(lm.up.shape)}, down {tuple(lm.down.shape)}) "
            f"does not fit the weight of shape {shape}{hint}")
    if lm.magnitude is not None and lm.magnitude.numel() != (out if lm.dora_axis == "out" else rest[0]):
        raise LoraMismatchError(
            f"{where}: DoRA module '{lm.key}' has a magnitude of {lm.magnitude.numel()} "
            f"{'rows' if lm.dora_axis == 'out' else 'input columns'} but the weight has shape {shape}{hint}")


def _unresolved_reason(source: BaseModel, key: str) -> str:
    """The skip reason of a LoRA key that names no module of the source; a reader that knows the
    key's kind (e.g. checkpoints.qwen: a text encoder it does not read) says so."""
    hint = getattr(source, "unresolved_hint", None)
    why = hint(key) if hint is not None else None
    return "no such module in the source model" + (f": {why}; dropped" if why else "")


def _refuse_other_family(lora: LoraFile, source: BaseModel, where: str) -> None:
    """Raise when the LoRA's metadata, key names or shapes say it is for a family unrelated to the
    source's (families.guess_lora): one line naming both."""
    member, how = guess_lora(lora)
    if member != "unknown" and not related(member, source.family):
        raise LoraMismatchError(f"{where}: a {member} LoRA ({how}), but source model {source.name} is "
                                f"{source.family}: a LoRA transfers between models of its own family")


def check_families(source: BaseModel, target: BaseModel, widths: str = "refuse") -> None:
    """Refuse a transfer between models whose layers do not correspond (families.check_pair;
    `widths`: the --widths option, which lets models of other widths through where a family allows)."""
    check_pair(source, target, widths)


def build_plan(lora: LoraFile, source: BaseModel, target: BaseModel, out_format: str | None = None,
               mapping: dict[str, str | None] | None = None, widths: str = "refuse") -> Plan:
    """Resolve every LoRA module in the source, check shapes, find its target counterpart: the
    same canonical module, or `mapping[module]` where layers were matched by similarity (None:
    the block was removed in the target). A target weight of another shape is skipped, or with
    widths="lstsq" given a job for LoRA-X's least-squares map (same kernel size only)."""
    out_format = out_format or lora.format
    check_format(out_format, target)
    warnings: list[str] = []
    check_families(source, target, widths)
    if source.family != target.family and related(source.family, target.family) and \
            "unknown" not in (source.family, target.family):
        how = "by similarity where depths differ" if mapping else "by name"
        warnings.append(f"{source.family} -> {target.family}: layers matched {how}")

    where = str(lora.path or "LoRA")
    resolved: dict[str, list[tuple[str, str, LoraModule | None]]] = {}
    missing: list[str] = []
    try:
        for key in lora.modules:
            hit = _resolve(source, key, lora.modules[key], where)
            if hit is None:
                missing.append(key)
            else:
                resolved[key] = hit
    except LoraMismatchError:  # a module that does not fit its weight: first, is the LoRA of another family?
        _refuse_other_family(lora, source, where)
        raise
    if lora.modules and len(resolved) < MIN_MATCH_SHARE * len(lora.modules):
        _refuse_other_family(lora, source, where)
        raise LoraMismatchError(
            f"{where}: only {len(resolved)} of {len(lora.modules)} modules exist in source model "
            f"{source.name} ({source.family}), e.g. '{missing[0]}': is the LoRA for another model?")

    seen: dict[str, str] = {}
    for key, parts in resolved.items():
        for module, _, _ in parts:
            if module in seen:
                raise InvalidLoraError(f"{where}: modules '{seen[module]}' and '{key}' both adapt {module}")
            seen[module] = key

    jobs: list[LayerJob] = []
    skipped = [Skip(k, None, None, _unresolved_reason(source, k)) for k in missing]
    for key, parts in resolved.items():
        for module, spelling, lm in parts:
            shape = source.weights[module].shape
            if lm is None:
                skipped.append(Skip(key, module, shape, "the LoRA is zero on this slice of the fused weight"))
                continue
            lm = fit_to_weight(lm, shape)
            _check_fits(lm, shape, where, source)
            tmodule = mapping.get(module, module) if mapping else module
            if tmodule is None:
                skipped.append(Skip(key, module, shape, "block removed in the target (similarity matching)"))
                continue
            tw = target.weights.get(tmodule)
            if tw is None:
                hint = target.missing_hint(tmodule)
                skipped.append(Skip(key, module, shape, "no counterpart in the target model" +
                                    (f": {hint}; dropped" if hint else "")))
                continue
            same_kernel = len(tw.shape) == len(shape) and tw.shape[2:] == shape[2:]
            if tw.shape != shape and not (widths == "lstsq" and same_kernel):
                hint = "; --widths lstsq maps it by LoRA-X's least-squares map" if same_kernel else ""
                skipped.append(Skip(key, module, shape, f"target weight has shape {tw.shape}{hint}"))
                continue
            key_out, why = out_key(target, tmodule, _out_spelling(lora.format, out_format, spelling, target))
            if key_out is None:
                skipped.append(Skip(key, module, shape, f"{out_format} output: {why}"))
                continue
            jobs.append(LayerJob(key, module, tmodule, key_out, shape, lm,
                                 tuple(tw.shape) if tw.shape != shape else None))
    return Plan(jobs, skipped, out_format, warnings)
