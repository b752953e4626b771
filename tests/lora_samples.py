"""LoRA files for the format tests (tests/formats/): modules with random factors (`mod`), files of
them (`lora_file`), raw files written by the safetensors library as other tools write them (`raw`,
`pair`), a few real module names per format, and the checks they share (`dw`, `close`,
`names_file_and_key`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prolora.lora import LoraFile, LoraModule

GEN = torch.Generator().manual_seed(1234)


def mod(key: str, out: int, inn: int, r: int, alpha: float | None = None, conv: tuple[int, int] | None = None,
        dtype: torch.dtype = torch.float32, bias: bool = False) -> LoraModule:
    if conv is None:
        down, up = torch.randn(r, inn, generator=GEN), torch.randn(out, r, generator=GEN)
    else:
        down, up = torch.randn(r, inn, *conv, generator=GEN), torch.randn(out, r, 1, 1, generator=GEN)
    b = torch.randn(out, generator=GEN).to(dtype) if bias else None
    return LoraModule(key, down.to(dtype), up.to(dtype), alpha, b)


def lora_file(fmt: str, modules: list[LoraModule], metadata: dict[str, str] | None = None,
              dtype: torch.dtype = torch.float32) -> LoraFile:
    return LoraFile(fmt, {m.key: m for m in modules}, dict(metadata or {}), dtype)


def raw(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write an input file with the safetensors library itself (as other tools do)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def dw(m: LoraModule) -> torch.Tensor:
    return m.scale * (m.up.double().flatten(1) @ m.down.double().flatten(1))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    """Relative Frobenius error below tol (float32 rounding of a folded scale is ~1e-7)."""
    return float((a.double() - b.double()).norm()) <= tol * float(b.double().norm())


def names_file_and_key(exc: pytest.ExceptionInfo, path: Path, key: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg, msg
    assert key in msg, msg


# A few real module names per format (SD1.5 diffusers names; SDXL names where noted).
KOHYA_SD1 = [
    mod("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 640, 640, 8, 4.0),
    mod("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 640, 768, 8, 4.0),
    mod("lora_unet_down_blocks_1_attentions_0_proj_in", 640, 640, 4, 2.0, conv=(1, 1)),
    mod("lora_unet_down_blocks_1_resnets_0_conv1", 640, 320, 4, 1.0, conv=(3, 3)),
    mod("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, 8, 8.0),
]


PEFT_SDXL = [
    mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640, 640, 8, 4.0),
    mod("unet.down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k", 1280, 2048, 16, 8.0),
    mod("unet.down_blocks.1.resnets.0.conv1", 640, 320, 4, 4.0, conv=(3, 3)),
    mod("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 768, 768, 8, 4.0),
    mod("text_encoder_2.text_model.encoder.layers.3.mlp.fc1", 5120, 1280, 8, 2.0),
]


OLD_SD1 = [
    mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640, 640, 8),
    mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", 640, 640, 8),
    mod("text_encoder.text_model.encoder.layers.0.self_attn.k_proj", 768, 768, 4),
]


COMFY_SDXL = [
    mod("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q", 640, 640, 8),
    mod("diffusion_model.input_blocks.4.0.in_layers.2", 640, 320, 4, conv=(3, 3)),
    mod("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", 768, 768, 8),
    mod("text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc2", 1280, 5120, 8),
]


EXAMPLES = {"kohya": KOHYA_SD1, "peft": PEFT_SDXL, "diffusers-old": OLD_SD1, "comfy": COMFY_SDXL}


def pair(stem: str, down: str = "lora_down.weight", up: str = "lora_up.weight", r: int = 2) -> dict:
    return {f"{stem}.{down}": torch.randn(r, 8), f"{stem}.{up}": torch.randn(8, r)}


KS = "lora_unet_down_blocks_0_attentions_0_proj_in"


KEYS = {
    "kohya": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
    "peft": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "diffusers-old": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "comfy": "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q",
}
