"""Z-Image models held in memory (the family's `claim_memory`): a ZImageTransformer2DModel by
itself (or its state dict with its config) or a Z-Image pipeline, read through the folder reader's
key map. The text encoder (Qwen3) is no LoRA target prolora transfers and is not read."""
from __future__ import annotations

from ...checkpoints.memory import LAYOUT, InMemory
from .keys import CLASS, COMPONENT, MEMBER, is_z_image_keys
from .model import ZImageModel
from .read import transformer_from_diffusers


def claim_memory(item: InMemory) -> ZImageModel | None:
    """The model of a Z-Image transformer or pipeline held in memory (by its class; a state dict
    whose config names no class, by its diffusers keys), else None."""
    d = item.denoiser
    if d is None:
        return None
    if d.class_name != CLASS and (d.class_name or is_z_image_keys(d.tensors) != ("", "diffusers")):
        return None
    weights, facts = transformer_from_diffusers(item.tensors(d.role, COMPONENT), item.where / COMPONENT, d.config)
    if item.pipeline:
        facts["pipeline"] = item.pipeline
    return item.finish(ZImageModel(path=item.where, name=item.name, layout=LAYOUT, family=MEMBER, weights=weights,
                                   files={}, headers={}, facts=facts))
