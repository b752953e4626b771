"""What the rest of prolora asks of families, answered from the records: may two models transfer,
which output formats a model has, what a LoRA is for, what a loader needs added to an output."""
from __future__ import annotations

from ..errors import ModelError
from .registry import families, get, of


def related(a: str, b: str) -> bool:
    """True when members `a` and `b` correspond layer by layer (same member, or a pair its family
    relates); an unknown member ("unknown": a model no rule names) relates to anything."""
    if a == b or "unknown" in (a, b):
        return True
    fa, fb = get(a), get(b)
    return fa is not None and fa is fb and fa.relates(a, b)


def check_pair(source, target, widths: str = "refuse") -> None:
    """Raise ModelError when a transfer between these two models must not run: families whose
    layers do not correspond, or a family's own rule (e.g. Wan models of other widths)."""
    fams = {id(f): f for f in (of(source), of(target)) if f is not None}.values()
    if not related(source.family, target.family):
        # a family may say why it cannot pair with another (FLUX.2 with FLUX.1: unrelated architectures)
        for fam in fams:
            why = fam.pair_refusal(source, target, widths) if fam.pair_refusal is not None else None
            if why is not None:
                raise ModelError(why)
        raise ModelError(f"source {source.name} is {source.family} but target {target.name} is {target.family}: "
                         "cross-family transfer is not supported")
    for fam in fams:
        if fam.pair_refusal is not None:
            why = fam.pair_refusal(source, target, widths)
            if why is not None:
                raise ModelError(why)


# formats that exist for a few families only: (name in messages, which models have it, alternatives)
_NARROW = {
    "xlabs": ("XLabs", "Flux", "write kohya, comfy or peft"),
    "diffusers-old": ("old diffusers", "UNet models", "choose peft, kohya{xlabs} (--format)"),
}


def check_format(fmt: str, model) -> None:
    """Raise ModelError if output format `fmt` has no layout for `model`'s family member."""
    fam = of(model)
    if fam is None or fam.supports_format(fmt, model.family):
        return
    label, who, alternatives = _NARROW.get(fmt, (fmt, "other families", "choose another (--format)"))
    xlabs = ", comfy or xlabs" if fam.supports_format("xlabs", model.family) else " or comfy"
    alternatives = alternatives.format(xlabs=xlabs)
    if not alternatives.endswith("(--format)"):
        alternatives += " (--format)"
    raise ModelError(f"the {label} LoRA format exists for {who} only; {model.name} is {model.family}: {alternatives}")


def pad_output(modules: dict, fmt: str, model) -> list[str]:
    """Add the zero-delta modules a client loader needs to read the output completely (the
    family's loader quirks); returns one warning per addition."""
    fam = of(model)
    if fam is None or fam.pad_output is None:
        return []
    return fam.pad_output(modules, fmt, model)


def guess_lora(lora) -> tuple[str, str]:
    """(member, how it was told) for a LoRA: from its base-model metadata if present, else from
    its key names and shapes, asking each family in registry order; ("unknown", why) otherwise."""
    for field in ("ss_base_model_version", "modelspec.architecture"):
        value = lora.metadata.get(field, "").lower()
        for fam in families():
            for needle, member in fam.metadata_hints:
                if needle in value:
                    return member, f"metadata {field}={lora.metadata[field]}"
    for fam in families():
        if fam.lora_hint is not None:
            hit = fam.lora_hint(lora)
            if hit is not None:
                return hit
    return "unknown", "no metadata and no telling names or shapes"
