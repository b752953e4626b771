"""Streaming tensors into a .safetensors file one at a time, so no model is ever whole in memory."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..safetensors_io import StreamingWriter

WEIGHTS = "diffusion_pytorch_model"  # diffusers' file stem for a model's weights

# (key, shape, a callable making the float tensor): the header is written from key and shape
# before any value exists, each value only when its turn comes
Item = tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]


def write_tensors(path: Path, items: list[Item], dtype: torch.dtype, metadata: dict[str, str]) -> None:
    """Write `items` to `path` in order, each cast to `dtype` as it is made."""
    entries = [(k, dtype, s) for k, s, _ in items]
    with StreamingWriter(path, entries, metadata) as w:
        for key, _, make in items:
            w.write(key, make().to(dtype).contiguous())
