"""What ComfyUI's XLabs reader needs of an XLabs output.

ComfyUI (comfy/lora_convert.py) reads a file as XLabs only when it holds both
`double_blocks.18.processor.qkv_lora2.up.weight` and `single_blocks.37.processor.qkv_lora.up.weight`
(bare names); otherwise it reads nothing from it. So an XLabs output gets those two modules as
zero-delta modules (up = 0: the merged weights are unchanged) when the similarity gate dropped them.
A model without such blocks (fewer than 19 double or 38 single blocks: no FLUX.1 release, only
cut-down test models) cannot have them; its XLabs output is written as before, with a warning
pointing at `--format comfy`.
"""
from __future__ import annotations

import torch

from ...lora import LoraModule

# (XLabs module, canonical module of the weight it adapts, rows of that weight it covers)
REQUIRED = (
    ("double_blocks.18.processor.qkv_lora2", "transformer.transformer_blocks.18.attn.add_q_proj", 3),
    ("single_blocks.37.processor.qkv_lora", "transformer.single_transformer_blocks.37.attn.to_q", 3),
)


def pad_output(modules: dict[str, LoraModule], fmt: str, model) -> list[str]:
    """Add the zero-delta modules ComfyUI's XLabs reader requires; one warning each (one in all
    when the model has no such block)."""
    if fmt != "xlabs" or not modules:
        return []
    lacking = [name for name, module, _ in REQUIRED if module not in model.weights]
    if lacking:
        return [f"ComfyUI's XLabs reader requires {' and '.join(n for n, _, _ in REQUIRED)}, and "
                f"{model.name} has no {lacking[0].split('.processor')[0]}: ComfyUI will read nothing from this "
                "XLabs file; write --format comfy (or kohya, peft) for ComfyUI"]
    some = next(iter(modules.values()))
    warnings = []
    for name, module, parts in REQUIRED:
        if name in modules:
            continue
        out, inn = model.weights[module].shape[0] * parts, model.weights[module].shape[1]
        down = torch.zeros(1, inn, dtype=some.down.dtype)
        up = torch.zeros(out, 1, dtype=some.up.dtype)
        modules[name] = LoraModule(name, down, up, None)
        warnings.append(f"added zero-delta module '{name}' (up = 0): ComfyUI reads an XLabs file only when it "
                        "holds this key")
    return warnings
