"""FLUX.2 models held in memory (the family's `claim_memory`): a Flux2Transformer2DModel by itself
(or its state dict with its config) or a Flux2Pipeline / Flux2KleinPipeline, read through the
folder reader's key map, so canonical ids, places and the identity come out as they do for the
same weights on disk; the pipeline's `is_distilled` tells the variant as model_index.json does."""
from __future__ import annotations

from ...checkpoints.memory import LAYOUT, InMemory
from .keys import CLASS, COMPONENT, MEMBER
from .model import Flux2Model
from .read import variant, weights_from

# a state dict whose config names no class: FLUX.2's shared modulation and fused single blocks
_KEYS = ("single_stream_modulation.linear.weight", "double_stream_modulation_img.linear.weight")


def claim_memory(item: InMemory) -> Flux2Model | None:
    """The model of a FLUX.2 transformer or pipeline held in memory, else None."""
    d = item.denoiser
    if d is None or d.role not in (COMPONENT, "model"):
        return None
    if d.class_name != CLASS and (d.class_name or not all(k in d.tensors for k in _KEYS)):
        return None
    weights, table, facts = weights_from(item.tensors(d.role, COMPONENT), "", False, item.where / COMPONENT)
    name, more = variant(facts["size"], item.pipeline, item.pipeline_config)
    facts.update(more)
    return item.finish(Flux2Model(path=item.where, name=item.name, layout=LAYOUT, family=MEMBER, weights=weights,
                                  files={}, headers={}, places=table, facts=facts, variant=name))
