"""The tiny class-conditional diffusion model: a diffusers UNet2DConditionModel (SD-style names,
cross-attention) whose condition is a learned class embedding fed as encoder_hidden_states.

Also: the cosine DDPM schedule, the noising used by training and scoring, a DDIM sampler with
classifier-free guidance, saving/loading a model folder (`unet/` as diffusers writes it, which
prolora reads, plus `cond.safetensors`), and merging a LoRA file's dW into a UNet.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data import CLASSES, SIZE

NULL = len(CLASSES)  # the "no class" token of classifier-free guidance
TOKENS, CROSS = 4, 32  # condition: 4 tokens of width 32 per class
T = 1000  # diffusion steps

# Source: attention at 8x8 (1 block) and 4x4 (2 blocks; the mid block has 2 as well).
SOURCE_UNET = dict(
    sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[16, 32, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 1, 2], cross_attention_dim=CROSS, attention_head_dim=8,
    use_linear_projection=True, norm_num_groups=8,
)
# Target 2: one transformer block wherever the source has two (SSD-1B-like pruning).
PRUNED_UNET = dict(SOURCE_UNET, transformer_layers_per_block=[1, 1, 1])
# which source block each pruned attention keeps (not always block 0, so name matching is wrong)
PRUNED_KEEP = {"down_blocks.2.attentions.0": 1, "mid_block.attentions.0": 0,
               "up_blocks.0.attentions.0": 1, "up_blocks.0.attentions.1": 0}
# the LoRA adapts every linear of the attention modules: projections in/out, attention, feed-forward
LORA_TARGETS = ["proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal): signal fraction at integer step t in [0, T)."""
    s = 0.008
    f = lambda u: torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return (f(t.double() + 1) / f(torch.zeros(1, dtype=torch.float64))).clamp(1e-5, 0.9999).float()


def noisy(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    ab = alpha_bar(t).view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


class ClassCond(nn.Module):
    """Class label -> TOKENS x CROSS encoder states (index NULL = unconditional)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(len(CLASSES) + 1, TOKENS * CROSS)
        nn.init.normal_(self.table.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels).view(len(labels), TOKENS, CROSS)


@dataclass
class Denoiser:
    unet: nn.Module
    cond: ClassCond

    def eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, self.cond(labels)).sample

    def copy(self) -> "Denoiser":
        return Denoiser(copy.deepcopy(self.unet), copy.deepcopy(self.cond))

    def eval(self) -> "Denoiser":
        self.unet.eval(), self.cond.eval()
        return self


def new_model(config: dict, seed: int) -> Denoiser:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return Denoiser(UNet2DConditionModel(**config), ClassCond())


def save_model(model: Denoiser, folder: Path) -> None:
    model.unet.save_pretrained(folder / "unet")
    save_file(model.cond.state_dict(), str(folder / "cond.safetensors"))


def load_model(folder: Path) -> Denoiser:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    cond = ClassCond()
    cond.load_state_dict(load_file(str(folder / "cond.safetensors")))
    return Denoiser(unet, cond).eval()


@torch.no_grad()
def sample(model: Denoiser, labels: torch.Tensor, seed: int, steps: int = 20, guidance: float = 2.0) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance; the same seed gives the same starting noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 3, SIZE, SIZE, generator=g)
    ts = torch.linspace(T - 1, 0, steps).round().long()
    both = torch.cat([labels, torch.full_like(labels, NULL)])
    for i, t in enumerate(ts):
        e_c, e_u = model.eps(torch.cat([x, x]), t.repeat(2 * len(x)), both).chunk(2)
        e = e_u + guidance * (e_c - e_u)
        ab = alpha_bar(t.view(1))
        x0 = ((x - (1 - ab).sqrt() * e) / ab.sqrt()).clamp(-1, 1)
        ab_next = alpha_bar(ts[i + 1].view(1)) if i + 1 < steps else torch.ones(1)
        x = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * e
    return x.clamp(-1, 1)


_BLOCK = re.compile(r"^(.*attentions\.\d+)\.transformer_blocks\.(\d+)\.(.*)$")


def prune(source: Denoiser) -> Denoiser:
    """Target 2 before distillation: PRUNED_UNET initialised from the source, each attention keeping
    the source block PRUNED_KEEP names; everything else copied by name."""
    pruned = new_model(PRUNED_UNET, seed=0)
    src = source.unet.state_dict()
    state = {}
    for name in pruned.unet.state_dict():
        m = _BLOCK.match(name)
        key = f"{m[1]}.transformer_blocks.{PRUNED_KEEP[m[1]]}.{m[3]}" if m and m[1] in PRUNED_KEEP else name
        state[name] = src[key].clone()
    pruned.unet.load_state_dict(state)
    pruned.cond.load_state_dict(source.cond.state_dict())
    return pruned


@torch.no_grad()
def merge_lora(unet: nn.Module, modules: dict, sign: float = 1.0) -> int:
    """Add (sign=-1: remove) each LoRA module's dW = scale * up @ down to the UNet's weight.
    `modules`: {'unet.<module path>': LoraModule} (peft spelling). Returns how many were merged."""
    named = dict(unet.named_modules())
    for key, m in modules.items():
        layer = named[key.removeprefix("unet.")]
        dw = m.scale * (m.up.double().reshape(m.up.shape[0], m.rank) @ m.down.double().reshape(m.rank, -1))
        layer.weight += sign * dw.reshape(layer.weight.shape).to(layer.weight.dtype)
    return len(modules)
