"""SD-family models held in memory: a pipeline whose denoiser is a UNet2DConditionModel (with its
CLIP text encoders), a UNet by itself, or a CLIP / T5 text encoder by itself."""
from __future__ import annotations

from ...checkpoints.encoders import Component, clip_from_transformers, t5_from_transformers
from ...checkpoints.memory import LAYOUT, InMemory, text_encoder_kind
from ...errors import ModelError
from .build import assemble, unet_from_diffusers
from .model import SdModel

_UNET_CLASSES = ("UNet2DConditionModel",)
_ENCODER_ROLES = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _is_unet(class_name: str, config: dict) -> bool:
    return class_name in _UNET_CLASSES or "down_block_types" in config


def claim_memory(item: InMemory) -> SdModel | None:
    """The model of a UNet pipeline, a UNet, or a lone CLIP / T5 encoder; None for anything else."""
    d = item.denoiser
    if d is None:
        return None
    if _is_unet(d.class_name, d.config):
        comps: list[Component] = [unet_from_diffusers(item.tensors(d.role, "unet"), str(item.where / "unet"))]
        for role in _ENCODER_ROLES:
            enc = item.parts.get(role)
            if enc is None:
                continue
            if text_encoder_kind(enc) != "clip":
                raise ModelError(f"{item.pipeline}: {role} is a {enc.class_name}, not a CLIP text encoder")
            comps.append(clip_from_transformers(item.tensors(role), role))
        return item.finish(assemble(item.where, LAYOUT, comps, {}, {}, name=item.name))
    if d.role != "model":
        return None
    kind = text_encoder_kind(d)
    if kind == "clip":
        role = "text_encoder_2" if "text_projection.weight" in d.tensors else "text_encoder"
        comp = clip_from_transformers(item.tensors("model", role), role)
    elif kind == "t5":
        comp = t5_from_transformers(item.tensors("model", "text_encoder_2"), "text_encoder_2")
    else:
        return None
    return item.finish(assemble(item.where, LAYOUT, [comp], {}, {}, name=item.name))
