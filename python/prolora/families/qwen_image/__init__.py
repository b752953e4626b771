"""Qwen-Image and Qwen-Image-Edit. (Transitional: the readers still live in checkpoints/qwen.py.)"""
from __future__ import annotations

import re
from pathlib import Path

from ..record import BenchPreset, Family


def claim_file(path: Path, header):
    from .model import is_qwen_keys, open_qwen_single_file
    return open_qwen_single_file(path, header) if is_qwen_keys(header.tensors) is not None else None


def claim_folder(path: Path):
    from .model import is_qwen_folder, open_qwen_folder
    return open_qwen_folder(path) if not (path / "unet").is_dir() and is_qwen_folder(path) else None


# the image / text streams' MLP and modulation under diffusers names, dotted or flattened
_QWEN = re.compile(r"(?:img|txt)_(?:mlp[._]net|mod[._]1)")


def lora_hint(lora):
    if any(_QWEN.search(k) for k in lora.modules):
        return "qwen-image", "Qwen-Image block names (img_mlp / txt_mlp / img_mod / txt_mod)"
    return None


FAMILY = Family(name="qwen-image", members=("qwen-image",), title="Qwen-Image (and -Edit)",
                claim_file=claim_file, claim_folder=claim_folder, lora_hint=lora_hint,
                bench={"qwen-image": BenchPreset("bfloat16", "Qwen-Image -> Qwen-Image-Edit, bf16")})
