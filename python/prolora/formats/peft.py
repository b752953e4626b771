"""PEFT / diffusers LoRA files: `<component>.<module path>.lora_A.weight` [r, in(, kh, kw)],
`.lora_B.weight` [out, r(, 1, 1)], optional `.lora_B.bias`.

Components are diffusers pipeline parts (`unet.`, `text_encoder.`, `text_encoder_2.`,
`transformer.`, ...). Keys without one (peft's own `base_model.model.` prefix, or a model-level
`save_lora_adapter` file) are kept as written and use the unprefixed part of the metadata.

The scale lives in the `lora_adapter_metadata` metadata entry: a JSON object holding one peft
LoraConfig per component, flattened with the component as prefix (`unet.r`, `unet.lora_alpha`,
`unet.rank_pattern`, ...; unprefixed fields for model-level files). diffusers 0.42 hands
`{field: value}` for each component straight to `LoraConfig(**...)`, so missing fields take
LoraConfig's defaults (r=8, lora_alpha=8). peft resolves a module's rank and alpha by taking the
first key of rank_pattern / alpha_pattern (in order) that matches `(.*\\.)?(KEY)$` as a regex
against the module's name inside the component; a `^` at the start anchors a key to the full name.
Without metadata, diffusers uses alpha = rank (scale 1) for every module.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter

import torch

try:  # the regular-expression parser of the re module (sre_parse before Python 3.11)
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover
    import sre_parse as _sre_parse  # type: ignore[no-redef]

from ..errors import InvalidLoraError
from ..lora import LoraFile, LoraModule
from .common import BIAS, DOWN, UP, folded_up

NAME = "peft"
METADATA_KEY = "lora_adapter_metadata"

# diffusers pipeline components that prefix keys (and metadata fields) in pipeline-level files
COMPONENTS = frozenset({
    "unet", "transformer", "transformer_2", "transformer_ref", "prior",
    "text_encoder", "text_encoder_2", "text_encoder_3", "connectors", "text_conditioner",
})
_KEY = re.compile(r"^(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector(?:\.weight)?)$")
_ROLES = {"lora_A.weight": DOWN, "lora_B.weight": UP, "lora_B.bias": BIAS, "lora_magnitude_vector": "magnitude",
          "lora_magnitude_vector.weight": "magnitude"}
_NOT_PEFT = ("diffusion_model.", "text_encoders.")  # ComfyUI prefixes
# DiffSynth-Studio (Qwen-Image) saves peft's in-model names, `<module>.lora_A.default.weight`;
# diffusers' Qwen-Image converter drops the `default.`, and so does this reader
_DEFAULT = re.compile(r"\.(lora_[AB]|lora_magnitude_vector)\.default\.weight$")
_TEXT_MODEL = "text_model."
LORA_CONFIG_DEFAULTS = {"r": 8, "lora_alpha": 8}


def match(key: str) -> tuple[str, str] | None:
    """(module, role) for a peft lora_A / lora_B key, else None."""
    m = _KEY.match(_DEFAULT.sub(r".\1.weight", key))
    if not m or m.group(1).startswith(_NOT_PEFT):
        return None
    return m.group(1), _ROLES[m.group(2)]


def alpha_module(stem: str) -> str:
    return stem


def split_component(key: str) -> tuple[str, str]:
    """('unet', 'down_blocks...') for a pipeline-level key, ('', key) otherwise."""
    head, _, rest = key.partition(".")
    if head in COMPONENTS and rest:
        return head, rest
    return "", key


# ------------------------------------------------------------------------------- reading


def parse_adapter_metadata(path: object, metadata: dict[str, str]) -> dict[str, dict] | None:
    """{component ('' for unprefixed fields): LoraConfig fields} from `lora_adapter_metadata`."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidLoraError(f"{path}: metadata '{METADATA_KEY}' is not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise InvalidLoraError(f"{path}: metadata '{METADATA_KEY}' is not a JSON object")
    configs: dict[str, dict] = {}
    for k, v in obj.items():
        component, _, field = str(k).rpartition(".")
        configs.setdefault(component, {})[field] = v
    return configs


# a pattern with more repeats (*, +, {m,n}) than this is refused (each one multiplies the work of a
# backtracking match by the length of the name)
_MAX_FREE_REPEATS = 2
_MAX_PATTERN_CHARS = 1000


def _slow_construct(items, inside_repeat: bool = False) -> str | None:
    """What in a parsed pattern can make a backtracking match take exponential time (a repeat or an
    alternation inside a repeat, a backreference), or None."""
    for op, av in items:
        name = str(op)
        if name in ("GROUPREF", "GROUPREF_EXISTS"):
            return "a backreference"
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            lo, hi, sub = av
            if hi > 1 and inside_repeat:
                return "a repeat inside a repeat"
            why = _slow_construct(sub, inside_repeat or hi > 1)
        elif name == "BRANCH":
            if inside_repeat:
                return "an alternation inside a repeat"
            why = next(filter(None, (_slow_construct(b, inside_repeat) for b in av[1])), None)
        elif name == "SUBPATTERN":
            why = _slow_construct(av[-1], inside_repeat)
        elif name in ("ASSERT", "ASSERT_NOT"):
            why = _slow_construct(av[1], inside_repeat)
        elif name == "ATOMIC_GROUP":
            why = _slow_construct(av, inside_repeat)
        else:
            continue
        if why is not None:
            return why
    return None


def _free_repeats(items) -> int:
    """How many repeats of more than one (e.g. `*`, `+`, `{2,9}`) a match may have to try in turn."""
    n = 0
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            n += (av[1] > 1) + _free_repeats(av[2])
        elif name == "BRANCH":
            n += max((_free_repeats(b) for b in av[1]), default=0)
        elif name == "SUBPATTERN":
            n += _free_repeats(av[-1])
        elif name in ("ASSERT", "ASSERT_NOT"):
            n += _free_repeats(av[1])
        elif name == "ATOMIC_GROUP":
            n += _free_repeats(av)
    return n


def _check_pattern(path: object, where: str, key: str) -> None:
    """Refuse a pattern key that is not a regular expression, or that a hostile file could use to
    make the match run for hours (peft matches keys with Python's backtracking `re`)."""
    def refuse(why: str) -> InvalidLoraError:
        return InvalidLoraError(f"{path}: metadata '{METADATA_KEY}' field '{where}' has a pattern {key[:80]!r} "
                                f"that {why}; prolora refuses it rather than risk an endless match")

    if not isinstance(key, str):  # JSON object keys are strings; kept for safety
        raise refuse("is not a string")
    if len(key) > _MAX_PATTERN_CHARS:
        raise refuse(f"is longer than {_MAX_PATTERN_CHARS} characters")
    try:
        items = _sre_parse.parse(key)
    except (re.error, RecursionError, OverflowError):
        raise InvalidLoraError(
            f"{path}: metadata '{METADATA_KEY}' field '{where}' has an invalid pattern '{key}'") from None
    why = _slow_construct(items)
    if why is not None:
        raise refuse(f"has {why}")
    if _free_repeats(items) > _MAX_FREE_REPEATS:
        raise refuse(f"has more than {_MAX_FREE_REPEATS} repeats such as * or +")


def _pattern_value(path: object, where: str, patterns: object, names: list[str]) -> object | None:
    """The value of the first pattern key matching any of `names`, as peft's get_pattern_key does."""
    if not patterns:
        return None
    if not isinstance(patterns, dict):
        raise InvalidLoraError(f"{path}: metadata '{METADATA_KEY}' field '{where}' is not an object")
    for key in patterns:
        _check_pattern(path, where, key)
    for name in names:
        for key, value in patterns.items():
            try:
                if re.match(rf"(.*\.)?({key})$", name):
                    return value
            except re.error:
                raise InvalidLoraError(
                    f"{path}: metadata '{METADATA_KEY}' field '{where}' has an invalid pattern '{key}'"
                ) from None
    return None


def _number(path: object, where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidLoraError(f"{path}: metadata '{METADATA_KEY}' field '{where}' is {value!r}, not a finite number")
    return float(value)


def alpha_from_config(path: object, configs: dict[str, dict], key: str, rank: int) -> float | None:
    """The alpha (scale * rank) diffusers would use for module `key`, or None if no config covers it."""
    component, rel = split_component(key)
    cfg = configs.get(component)
    if cfg is None:
        return None
    prefix = f"{component}." if component else ""
    names = [rel] + ([rel[len(_TEXT_MODEL):]] if rel.startswith(_TEXT_MODEL) else [])
    r = _pattern_value(path, prefix + "rank_pattern", cfg.get("rank_pattern"), names)
    if r is None:
        r = cfg.get("r", LORA_CONFIG_DEFAULTS["r"])
    alpha = _pattern_value(path, prefix + "alpha_pattern", cfg.get("alpha_pattern"), names)
    if alpha is None:
        alpha = cfg.get("lora_alpha", LORA_CONFIG_DEFAULTS["lora_alpha"])
    r, alpha = _number(path, prefix + "r", r), _number(path, prefix + "lora_alpha", alpha)
    if r != rank:
        raise InvalidLoraError(
            f"{path}: module '{key}' has rank {rank} in its tensors but rank {r:g} in metadata "
            f"'{METADATA_KEY}' ({prefix}r / {prefix}rank_pattern); diffusers could not load it"
        )
    if cfg.get("use_rslora"):
        return alpha * math.sqrt(rank)  # rsLoRA scale alpha/sqrt(r), expressed as alpha'/r
    return alpha


def apply_metadata_alphas(path: object, modules: dict[str, LoraModule], metadata: dict[str, str]) -> None:
    """Set each module's alpha from `lora_adapter_metadata` (modules with an `.alpha` key keep it)."""
    configs = parse_adapter_metadata(path, metadata)
    if not configs:
        return
    for key, m in modules.items():
        if m.alpha is None:
            m.alpha = alpha_from_config(path, configs, key, m.rank)


# ------------------------------------------------------------------------------- writing


def _pattern(rel: str) -> str:
    """A rank/alpha pattern matching exactly this module (inside its component).

    CLIP text-encoder paths are written without `text_model.` and unanchored, so they match
    both transformers' flattened CLIPTextModel (`encoder.layers...`) and the nested one
    (`text_model.encoder.layers...`); everything else is anchored with `^` as diffusers does.
    """
    if rel.startswith(_TEXT_MODEL):
        return rel[len(_TEXT_MODEL):]
    return "^" + rel


def _target(rel: str) -> str:
    return rel[len(_TEXT_MODEL):] if rel.startswith(_TEXT_MODEL) else rel


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def adapter_metadata(modules: dict[str, LoraModule]) -> str | None:
    """The `lora_adapter_metadata` JSON that makes diffusers use each module's alpha.

    None when no module has an alpha: diffusers then uses scale 1, which is what alpha None means.
    """
    if all(m.alpha is None for m in modules.values()):
        return None
    groups: dict[str, list[tuple[str, LoraModule]]] = {}
    for key, m in modules.items():
        component, rel = split_component(key)
        groups.setdefault(component, []).append((rel, m))
    out: dict[str, object] = {}
    for component, items in groups.items():
        ranks = Counter(m.rank for _, m in items)
        r = ranks.most_common(1)[0][0]
        alphas = [(rel, float(m.rank if m.alpha is None else m.alpha), m) for rel, m in items]
        lora_alpha = Counter(a for _, a, _ in alphas).most_common(1)[0][0]
        cfg = {
            "r": r,
            "lora_alpha": _json_number(lora_alpha),
            "rank_pattern": {_pattern(rel): m.rank for rel, m in items if m.rank != r},
            "alpha_pattern": {_pattern(rel): _json_number(a) for rel, a, _ in alphas if a != lora_alpha},
            "target_modules": sorted({_target(rel) for rel, _ in items}),
            "lora_bias": any(m.bias is not None for _, m in items),
            "use_dora": False,
        }
        prefix = f"{component}." if component else ""
        out.update({prefix + k: v for k, v in cfg.items()})
    return json.dumps(out, indent=2, sort_keys=True)


def unit_scales(modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
    """Every module with its scale folded into up and alpha = its rank (scale 1): the metadata then
    says alpha = r for each module, which diffusers applies, and a loader that ignores the metadata
    (ComfyUI) uses scale 1, so both apply the intended dW. The same dict when nothing changes."""
    if all(m.alpha is None or m.scale == 1.0 for m in modules.values()):
        return modules
    return {k: m if m.alpha is None or m.scale == 1.0 else
            dataclasses.replace(m, up=folded_up(m), alpha=float(m.rank)) for k, m in modules.items()}


def to_tensors(lora: LoraFile, path: object) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, m in lora.modules.items():
        if not name or name.startswith(_NOT_PEFT) or "" in name.split(".") or _KEY.match(name + ".lora_A.weight") is None:
            raise InvalidLoraError(f"{path}: module key '{name}' is not a dotted peft/diffusers module path")
        out[f"{name}.lora_A.weight"] = m.down
        out[f"{name}.lora_B.weight"] = m.up
        if m.bias is not None:
            out[f"{name}.lora_B.bias"] = m.bias
    return out


def effective_alpha(m: LoraModule) -> float:
    return float(m.rank if m.alpha is None else m.alpha)
