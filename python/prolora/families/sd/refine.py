"""The SD family's part of `--refine` (prolora.refine asks for it through `Family.part("refine")`):
the UNet2DConditionModel denoiser and the inputs it takes.

- a single LDM/SGM file becomes a UNet2DConditionModel whose config is read off the UNet weights'
  shapes (`unet_config`), filled through the single-file plan the writers use (read backwards);
- a pipeline folder's text encoders: CLIP-L (SD1.x / SD2.x: its last hidden state), or CLIP-L and
  OpenCLIP-bigG (SDXL: both penultimate states concatenated, the second's projected pooled output
  as `text_embeds`);
- the forward's inputs: latent noise [N, C, R, R], integer DDPM timesteps in [0, 1000), the
  context, and SDXL's `added_cond_kwargs` (text_embeds and the time ids of the pixel image the
  latent stands for).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ...checkpoints import BaseModel
from ...errors import ModelError, OptionError
from .read import UNET_PREFIX, single_file_plan

COMPONENT = "unet"  # the component refinement trains
DESCRIBES = "SD-family UNets"  # what the refusal of other families says refinement supports
CLASSES = ("UNet2DConditionModel",)  # diffusers classes built from a component folder
DEFAULT_CLASS = "UNet2DConditionModel"  # a UNet folder whose config names no class
EVEN_LATENTS = None  # any latent side of at least 2 works
TOKENS = 77  # CLIP's context length: random conditioning's default
STEPS = 1000  # DDPM training steps of SD-family UNets


def claims(base: BaseModel) -> bool:
    """Whether `base` holds a UNet refinement can train (an SD model without one does not)."""
    return any(m.startswith("unet.") for m in base.weights)


# ------------------------------------------------------------------------------ single files


def _shape(base: BaseModel, module: str) -> tuple[int, ...] | None:
    ref = base.weights.get(module)
    return None if ref is None else tuple(ref.shape)


def _count(base: BaseModel, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for m in (rx.match(k) for k in base.weights) if m})


def unet_config(base: BaseModel) -> dict:
    """A UNet2DConditionModel config read off a single file's UNet weights (canonical names).

    Everything that shapes a parameter comes from the shapes; what no shape tells (the number of
    attention heads) follows the member: 8 heads for SD1.x, 64-wide heads otherwise (SD2.x, SDXL),
    as in the published configs, 32-wide at widths no published UNet has (`_heads`)."""
    w = lambda m: _shape(base, "unet." + m)  # noqa: E731
    levels = _count(base, r"^unet\.down_blocks\.(\d+)\.")
    if levels == 0 or w("conv_in") is None:
        raise ModelError(f"{base.path}: no UNet to build (conv_in / down_blocks missing)")
    chans = [w(f"down_blocks.{i}.resnets.0.conv2")[0] for i in range(levels)]
    layers = _count(base, r"^unet\.down_blocks\.0\.resnets\.(\d+)\.")
    down_types, up_types, depths, up_depths = [], [], [], []
    for i in range(levels):
        has = _count(base, rf"^unet\.down_blocks\.{i}\.attentions\.(\d+)\.") > 0
        down_types.append("CrossAttnDownBlock2D" if has else "DownBlock2D")
        depths.append(max(1, _count(base, rf"^unet\.down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")))
        has_up = _count(base, rf"^unet\.up_blocks\.{i}\.attentions\.(\d+)\.") > 0
        up_types.append("CrossAttnUpBlock2D" if has_up else "UpBlock2D")
        up_depths.append([max(1, _count(base, rf"^unet\.up_blocks\.{i}\.attentions\.{j}\.transformer_blocks\.(\d+)\."))
                          for j in range(layers + 1)])
    k = next((m for m in base.weights if m.startswith("unet.") and m.endswith("attn2.to_k")), None)
    proj = next((m for m in base.weights if m.startswith("unet.") and m.endswith(".proj_in")), None)
    if _count(base, r"^unet\.mid_block\.(attentions)\.") > 0:
        mid = "UNetMidBlock2DCrossAttn"
    elif _count(base, r"^unet\.mid_block\.(resnets)\.") > 0:
        mid = "UNetMidBlock2D"
    else:
        mid = None
    sd1 = base.family == "sd1"
    cfg = dict(
        in_channels=w("conv_in")[1], out_channels=w("conv_out")[0], block_out_channels=chans, layers_per_block=layers,
        down_block_types=down_types, up_block_types=up_types, mid_block_type=mid,
        cross_attention_dim=_shape(base, k)[1] if k else 768,
        use_linear_projection=proj is not None and len(_shape(base, proj)) == 2,
        transformer_layers_per_block=depths, norm_num_groups=32,
        attention_head_dim=_heads(chans, sd1),
    )
    reverse = [d for d in up_depths]
    if reverse != [[depths[levels - 1 - i]] * (layers + 1) for i in range(levels)]:
        cfg["reverse_transformer_layers_per_block"] = reverse
    if w("add_embedding.linear_1") is not None:  # SDXL's text_time conditioning
        total = w("add_embedding.linear_1")[1]
        pooled = _pooled_width(base, total)
        cfg.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=total,
                   addition_time_embed_dim=(total - pooled) // 6)
    return cfg


def _heads(chans: list[int], sd1: bool) -> int | list[int]:
    """Heads per level where no shape tells: at the published widths (levels of 320, 640, 1280
    channels) SD1.x's 8 heads and the 64-wide heads of SD2.x / SDXL / SSD-1B; other widths are the
    project's shrunken synthetic UNets, whose configs (synthetic.shrink) use 32-wide heads."""
    if all(c in (320, 640, 1280) for c in chans):
        return 8 if sd1 else [c // 64 for c in chans]
    return [max(1, c // 32) for c in chans]


def _pooled_width(base: BaseModel, total: int) -> int:
    """Width of SDXL's pooled text embedding inside add_embedding's input (the rest is six
    time-id embeddings): the second encoder's projection width when the file holds it, else
    SDXL's 1280 when that leaves six equal parts, else the cross-attention width minus CLIP-L's."""
    te2 = _shape(base, "text_encoder_2.text_projection")
    if te2 is not None:
        return te2[0]
    if total > 1280 and (total - 1280) % 6 == 0:
        return 1280
    return total - 6 * 256


def from_single_file(base: BaseModel, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The UNet of a single file: the model (on the meta device) and its state dict from the file."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**unet_config(base))
    params = {"unet": [(n, tuple(p.shape)) for n, p in model.state_dict().items()]}
    path = Path(base.path)
    header = base.headers[path]
    if any(k.startswith(UNET_PREFIX) for k in header.tensors):
        key_of = lambda e: e.key  # noqa: E731
    elif any(k.startswith("input_blocks.") for k in header.tensors):
        key_of = lambda e: e.key[len(UNET_PREFIX):]  # noqa: E731
    else:  # diffusers names in a single file
        key_of = lambda e: e.sources[0][1]  # noqa: E731
    state = {}
    f = base._file(path)
    for e in single_file_plan(params):
        key = key_of(e)
        if key not in header.tensors:
            raise ModelError(f"{path}: tensor '{key}' that the UNet needs is missing")
        state[e.sources[0][1]] = f.get(key).to(dtype)
    return model, state


# ------------------------------------------------------------------------------ conditioning


def text_encoders(base: BaseModel, root: Path) -> list[tuple[str, str, str]]:
    """(role, encoder folder, tokenizer folder) of the pipeline folder `root`: CLIP-L, and SDXL's
    OpenCLIP-bigG (with projection) where the folder has a second encoder."""
    if (root / "text_encoder_2").is_dir():
        return [("clip", "text_encoder", "tokenizer"), ("clip2", "text_encoder_2", "tokenizer_2")]
    return [("clip", "text_encoder", "tokenizer")]


def encoder_components(base: BaseModel) -> list[tuple[str, bool]]:
    """(component, drop the last layer) of the encoders a single file may embed, in context order:
    CLIP-L / OpenCLIP-H (`cond_stage_model.*`, SDXL's `conditioner.embedders.0`) and SDXL's
    OpenCLIP-G (`conditioner.embedders.1`). SD2.x files store OpenCLIP-H's 24 layers and read its
    penultimate one, as diffusers' converter does (a 23-layer encoder): the last layer is dropped."""
    layers = {m.split(".")[3] for m in base.weights if m.startswith("text_encoder.text_model.encoder.layers.")}
    ref = next((r for m, r in base.weights.items() if m.startswith("text_encoder.")), None)
    penultimate = ref is not None and ".resblocks." in ref.key and len(layers) == 24 and \
        not any(m.startswith("text_encoder_2.") for m in base.weights)
    return [("text_encoder", penultimate), ("text_encoder_2", False)]


def context_width(encoders: list[tuple[str, int]]) -> int:
    """Context width the encoders [(role, hidden)] give: every CLIP's states, concatenated."""
    return sum(h for _, h in encoders)


def take(role: str, out, count: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(context part, pooled) of one encoder's output: SD1/SD2 the last hidden state; SDXL each
    CLIP's penultimate state, and the second's projected pooled output."""
    if count == 1:
        return out.last_hidden_state, None
    return out.hidden_states[-2], (out.text_embeds if role == "clip2" else None)


def signature(config, names: frozenset[str]) -> dict | None:
    """The inputs a UNet2DConditionModel's forward takes (None for another denoiser)."""
    if "sample" not in names:
        return None
    pooled = None
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    elif config.get("addition_embed_type") or config.get("class_embed_type"):
        raise OptionError(f"refinement does not know the UNet's {config.get('addition_embed_type') or 'class'} "
                          "conditioning")
    cross = config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    return dict(channels=config["in_channels"], context_dim=int(cross), pooled_dim=pooled, time_ids=pooled is not None,
                guidance=False, accepts=names)


def noise(sig, n: int, resolution: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent noise [n, C, R, R] and integer DDPM timesteps, drawn from `g` in this order."""
    x = torch.randn(n, sig.channels, resolution, resolution, generator=g)
    t = torch.randint(0, STEPS, (n,), generator=g)
    return x, t


def inputs(sig, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None,
           resolution: int, dev, device: str) -> dict:
    """The forward's keywords (`dev` moves a tensor to the model's device and dtype)."""
    kw = dict(sample=dev(x), timestep=t.to(device), encoder_hidden_states=dev(hidden))
    if sig.time_ids:
        size = float(8 * resolution)
        ids = torch.tensor([[size, size, 0.0, 0.0, size, size]]).repeat(x.shape[0], 1)
        kw["added_cond_kwargs"] = {"text_embeds": dev(pooled), "time_ids": dev(ids)}
    return kw
