"""FLUX.1 / Chroma models held in memory: a pipeline whose transformer is a FluxTransformer2DModel or
ChromaTransformer2DModel (with its CLIP-L and T5 encoders), such a transformer by itself, or its
`(state_dict, config)`. They are read through the folder reader's key map, so canonical ids, BFL
places and the identity come out as they do for the same weights on disk."""
from __future__ import annotations

import re

from ...checkpoints.encoders import clip_from_transformers, t5_from_transformers
from ...checkpoints.memory import LAYOUT, Held, InMemory, text_encoder_kind
from ...errors import ModelError
from .chroma import member
from .keys import COMPONENT, T5
from .model import FluxModel
from .read import CLASSES, order, transformer_from_diffusers

_ENCODER_ROLES = ("text_encoder", "text_encoder_2", "text_encoder_3")
# a state dict given with a config that names no class: FLUX.1's per-block modulation or Chroma's
# approximator under diffusers names, and none of FLUX.2's shared modulation
_FLUX1_MARK = re.compile(r"^(?:transformer_blocks\.\d+\.norm1\.linear|single_transformer_blocks\.\d+\.norm\.linear|"
                         r"distilled_guidance_layer\.in_proj)\.weight$")
_NEWER_MARK = re.compile(r"^(?:double_stream_modulation_(?:img|txt)|single_stream_modulation)\.")


def is_flux_transformer(h: Held) -> bool:
    """A FLUX.1 / Chroma transformer: its class is one of CLASSES exactly, or (a state dict whose
    config has no `_class_name`) a Flux config with FLUX.1's keys and none of FLUX.2's."""
    if h.class_name:
        return h.class_name in CLASSES
    if "num_single_layers" not in h.config or any(_NEWER_MARK.match(k) for k in h.tensors):
        return False
    return any(_FLUX1_MARK.match(k) for k in h.tensors)


def claim_memory(item: InMemory) -> FluxModel | None:
    """The model of a FLUX.1 / Chroma pipeline or transformer; None for anything else."""
    d = item.denoiser
    if d is None or d.role not in (COMPONENT, "model") or not is_flux_transformer(d):
        return None
    weights, bfl, facts = transformer_from_diffusers(item.tensors(d.role, COMPONENT), str(item.where / COMPONENT))
    encoders: dict[str, dict] = {}
    t5_component = T5
    for role in _ENCODER_ROLES if d.role == COMPONENT else ():
        enc = item.parts.get(role)
        if enc is None:
            continue
        kind = text_encoder_kind(enc)
        if kind == "clip":
            comp = clip_from_transformers(item.tensors(role), "text_encoder")
        elif kind == "t5":  # FLUX.1 keeps T5 in text_encoder_2, Chroma in text_encoder; canonical ids say text_encoder_2
            comp = t5_from_transformers(item.tensors(role), T5)
            t5_component = role
        else:
            raise ModelError(f"{item.pipeline}: {role} is a {enc.class_name}, not a CLIP or T5 text encoder")
        weights.update(comp.weights)
        encoders[comp.name] = comp.facts
    model = FluxModel(path=item.where, name=item.name, layout=LAYOUT, family=member(weights), weights=order(weights),
                      files={}, headers={}, text_encoders=encoders, bfl=bfl, facts=facts, t5_component=t5_component)
    return item.finish(model)
