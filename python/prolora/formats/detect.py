"""Format detection from tensor names alone: which LoRA format a file is in, which keys are known
extras to drop, and which adapter kinds or layouts prolora refuses (with a message naming them)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from ..errors import InvalidLoraError, UnsupportedFormatError
from . import comfy, diffusers_old, kohya, peft, xlabs

# Tried in this order; their down/up key patterns do not overlap.
FORMAT_MODULES = {m.NAME: m for m in (kohya, comfy, xlabs, diffusers_old, peft)}

# (kind, pattern searched in each key, why it cannot be transferred)
UNSUPPORTED: list[tuple[str, re.Pattern, str]] = [
    ("GLoRA", re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "a generalised LoRA is not a single additive update"),
    ("OFT/BOFT", re.compile(r"\.(oft_blocks|oft_diag|oft_r|oft_s|oft_R|boft_\w+)(\.|$)"),
     "an orthogonal fine-tune rotates the weight instead of adding a dW"),
    ("IA3", re.compile(r"\.ia3_l\b|\.on_input$"), "an IA3 adapter scales activations instead of adding a dW"),
    ("LyCORIS norm", re.compile(r"\.(w_norm|b_norm)$"), "norm-layer adapters change no LoRA-able weight"),
    ("LoKr Tucker-1", re.compile(r"\.lokr_t1$"), "no LoKr loader (LyCORIS, ComfyUI) reads a first-factor core"),
]

# Known harmless extras: (pattern, reason recorded in LoraFile.dropped)
DROPPED: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^bundle_emb\."), "bundled textual-inversion embedding: not a LoRA weight, not transferred"),
]


@dataclass
class Classified:
    """A file's keys sorted out: its format, each weight key's (module, role), alpha keys, extras."""

    format: str
    weights: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (module, role)
    alphas: dict[str, str] = field(default_factory=dict)  # key -> module
    dropped: dict[str, str] = field(default_factory=dict)  # key -> reason


def _examples(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def refuse_unsupported(path: object, keys: Iterable[str]) -> None:
    """Raise UnsupportedFormatError if any key belongs to an adapter kind prolora cannot transfer."""
    keys = list(keys)
    for kind, pattern, why in UNSUPPORTED:
        found = [k for k in keys if pattern.search(k)]
        if found:
            raise UnsupportedFormatError(
                f"{path}: {kind} adapter key {_examples(found, 1)} ({len(found)} {kind} keys in all): {why}; "
                "prolora transfers adapters with a dense dW (LoRA, LoCon, LoHa, LoKr, full differences, DoRA)"
            )


def classify(path: object, keys: Iterable[str]) -> Classified:
    """Detect the format of a LoRA file from its tensor names; refuse what prolora cannot read."""
    keys = list(keys)
    if not keys:
        raise UnsupportedFormatError(f"{path}: the file holds no tensors, so it is no LoRA")
    refuse_unsupported(path, keys)

    dropped: dict[str, str] = {}
    alpha_keys: list[str] = []
    unknown: list[str] = []
    by_format: dict[str, dict[str, tuple[str, str]]] = {}
    for key in keys:
        reason = next((why for pattern, why in DROPPED if pattern.search(key)), None)
        if reason is not None:
            dropped[key] = reason
            continue
        if key.endswith(".alpha"):
            alpha_keys.append(key)
            continue
        for name, module in FORMAT_MODULES.items():
            hit = module.match(key)
            if hit is not None:
                by_format.setdefault(name, {})[key] = hit
                break
        else:
            unknown.append(key)

    if unknown:
        raise UnsupportedFormatError(
            f"{path}: {len(unknown)} key(s) of no known LoRA format (kohya, peft/diffusers, old diffusers, "
            f"ComfyUI, XLabs): {_examples(unknown)}"
        )
    if len(by_format) > 1:
        parts = [f"{len(found)} {name} key(s) such as '{next(iter(found))}'" for name, found in by_format.items()]
        raise UnsupportedFormatError(
            f"{path}: the file mixes LoRA formats: {' and '.join(parts)}; split it into one file per format"
        )
    if not by_format:
        what = _examples(alpha_keys or list(dropped))
        raise UnsupportedFormatError(f"{path}: no LoRA down/up weights found, only {what}")

    fmt, weights = next(iter(by_format.items()))
    module_names = {m for m, _ in weights.values()}
    alphas: dict[str, str] = {}
    for key in alpha_keys:
        module = FORMAT_MODULES[fmt].alpha_module(key[: -len(".alpha")])
        if module not in module_names:
            raise InvalidLoraError(
                f"{path}: alpha '{key}' belongs to no module with down/up weights in this {fmt} file"
            )
        alphas[key] = module
    return Classified(fmt, weights, alphas, dropped)


def detect_format(keys: Iterable[str], path: object = "<keys>") -> str:
    """The LoRA format ('kohya', 'peft', 'diffusers-old', 'comfy' or 'xlabs') of a file with these tensor names."""
    return classify(path, keys).format
