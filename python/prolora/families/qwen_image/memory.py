"""Qwen-Image models held in memory (the family's `claim_memory`): a QwenImageTransformer2DModel by
itself (or its state dict with its config) or a Qwen-Image pipeline, read through the folder
reader's key map; the pipeline's class tells the variant as model_index.json does. The text
encoder (Qwen2.5-VL) is no LoRA target prolora transfers and is not read."""
from __future__ import annotations

from ...checkpoints.memory import LAYOUT, InMemory
from ...errors import ModelError
from .keys import CLASS, COMPONENT, MEMBER, V21_CLASS, V21_REFUSAL
from .model import QwenModel
from .read import is_qwen_keys, transformer_from_diffusers

def claim_memory(item: InMemory) -> QwenModel | None:
    """The model of a Qwen-Image transformer or pipeline held in memory (by its class; a state
    dict whose config names no class, by its keys), else None. Qwen-Image-2.1 is refused by name."""
    d = item.denoiser
    if d is None:
        return None
    if d.class_name == V21_CLASS:
        raise ModelError(V21_REFUSAL)
    if d.class_name != CLASS and (d.class_name or is_qwen_keys(d.tensors) != ""):  # is_qwen_keys refuses 2.1 keys
        return None
    weights, facts, variant = transformer_from_diffusers(item.tensors(d.role, COMPONENT), item.where / COMPONENT,
                                                         d.config, item.pipeline)
    return item.finish(QwenModel(path=item.where, name=item.name, layout=LAYOUT, family=MEMBER, weights=weights,
                                 files={}, headers={}, facts=facts, variant=variant))
