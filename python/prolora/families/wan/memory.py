"""Wan models held in memory (the family's `claim_memory`): a WanTransformer3DModel by itself (or
its state dict with its config), or a WanPipeline. A Wan 2.2 A14B pipeline (transformer and
transformer_2) is read as its folder is, both experts in one model; each expert module by itself
is an ordinary Wan model (what a transfer onto one expert takes: prolora.diffusers.load_lora does
one per expert). The text encoder (UMT5) is no LoRA target prolora transfers and is not read."""
from __future__ import annotations

from ...checkpoints.memory import LAYOUT, Held, InMemory
from ...errors import ModelError
from .experts import EXPERTS
from .keys import CLASS, COMPONENT
from .model import WanModel
from .read import _family, transformers_from_diffusers, wan_prefix


def _is_wan(h: Held) -> bool:
    """A WanTransformer3DModel by its class; a state dict whose config names no class, by its
    diffusers Wan names (the file reader's test)."""
    return h.class_name == CLASS or (not h.class_name and wan_prefix(h.tensors) == ("", False))


def claim_memory(item: InMemory) -> WanModel | None:
    """The Wan model of a Wan transformer or pipeline held in memory, else None."""
    d = item.denoiser
    if d is None or not _is_wan(d):
        return None
    boundary = None
    if d.role == "model":
        parts = {COMPONENT: item.tensors("model", COMPONENT)}
    else:
        experts = {c: item.parts[c] for c in EXPERTS.values() if c in item.parts}
        for c, h in experts.items():
            if not _is_wan(h):
                raise ModelError(f"{item.pipeline}: {c} is a {h.class_name}, not a {CLASS}")
        parts = {c: item.tensors(c) for c in experts}
        if len(parts) == 2:
            boundary = item.pipeline_config.get("boundary_ratio")
    weights, original, facts = transformers_from_diffusers(parts, item.where, boundary)
    return item.finish(WanModel(path=item.where, name=item.name, layout=LAYOUT, family=_family(facts),
                                weights=weights, files={}, headers={}, original=original, facts=facts))
