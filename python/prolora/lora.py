"""The canonical in-memory LoRA: one record per adapted module, whatever file format it came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

# File formats the readers recognise and the writers produce.
FORMATS = ("kohya", "peft", "diffusers-old", "comfy", "xlabs")


@dataclass
class LoraModule:
    """One adapted module: dW = scale * up @ down.

    `key` is the module name as the file spells it, without the tensor suffix:
    kohya ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, PEFT/diffusers and old
    diffusers ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` (old spellings
    such as ``processor.to_q_lora`` already normalised), ComfyUI ``diffusion_model.input_blocks...``.
    down is (r, in) or (r, in, kh, kw); up is (out, r) or (out, r, 1, 1).
    alpha None means the file had none: scale 1.
    """

    key: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    bias: torch.Tensor | None = None  # PEFT lora_B.bias (or a full difference's diff_b), carried as is
    # the adapter kind it was read as ("lora", "locon-tucker", "lokr", "loha", "full", "dora",
    # "lokr+dora", ...; formats.adapters) and the relative Frobenius error of its LoRA form (None: exact)
    kind: str = "lora"
    error: float | None = None
    # DoRA: the magnitude vector, its axis ("out": per output row, "in": per input column) and the
    # eps added to the norm; the dW needs the source weight (formats.adapters.realize_dora)
    magnitude: torch.Tensor | None = None
    dora_axis: str | None = None
    dora_eps: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def in_features(self) -> int:
        """Input size of the flattened weight (in * kh * kw for convs)."""
        return int(self.down[0].numel())

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def needs_base(self) -> bool:
        """Its dW depends on the base weight (DoRA): formed when the source weight is read."""
        return self.magnitude is not None


@dataclass
class LoraFile:
    """A whole LoRA file: its format, modules keyed by `LoraModule.key`, and string metadata."""

    format: str
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype = torch.float16
    path: Path | None = None
    # keys the reader recognised but does not transfer (e.g. bundled embeddings), with the reason
    dropped: dict[str, str] = field(default_factory=dict)
