"""The Flux family's part of `--refine` (prolora.refine asks for it through `Family.part("refine")`):
the FluxTransformer2DModel / ChromaTransformer2DModel denoiser and the inputs it takes.

- a BFL single file (FLUX.1 only) becomes a FluxTransformer2DModel whose config is read off the
  file's shapes (`flux_config`), filled through the whole-file plan the writers use, read backwards;
- a pipeline folder's text encoders: FLUX.1 CLIP-L (its pooled output) and T5 (the context);
  Chroma T5 alone;
- the forward's inputs: packed latent noise [N, (R/2)^2, C] with its image ids, the flow time in
  (0, 1], the context and its (zero) text ids, the pooled projection where the model takes one and
  FLUX.1-dev's distilled guidance (3.5).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...errors import ModelError
from .chroma import CHROMA, FLUX
from .keys import COMPONENT, T5, bfl_file_plan, is_flux_keys
from .model import FluxModel

DESCRIBES = "Flux/Chroma transformers"  # what the refusal of other families says refinement supports
CLASSES = ("FluxTransformer2DModel", "ChromaTransformer2DModel")  # diffusers classes built from a folder
DEFAULT_CLASS = None  # a transformer folder must name its class
EVEN_LATENTS = "Flux"  # latents are packed 2x2: the resolution message names the family for the rule
TOKENS = 256  # T5 context tokens: random conditioning's default
GUIDANCE = 3.5  # FLUX.1-dev's usual distilled guidance

def claims(base) -> bool:
    """Whether `base` holds a transformer refinement can train (every FLUX.1 / Chroma model)."""
    return isinstance(base, FluxModel) and base.family in (FLUX, CHROMA)


# ------------------------------------------------------------------------------ single files


def flux_config(base: FluxModel) -> dict:
    """A FluxTransformer2DModel config read off a BFL file's shapes: widths and block counts from
    the weights, the head width from the QK-norm scale, FLUX.1's rope axes (16, 56, 56) at head
    width 128 (else even axes in the same proportions), guidance_embeds where guidance_in exists."""
    path = Path(base.path)
    header = base.headers[path]
    prefix = is_flux_keys(header.tensors) or ""
    shape = lambda k: tuple(header.tensors[prefix + k].shape) if prefix + k in header.tensors else None  # noqa: E731
    img_in, txt_in = shape("img_in.weight"), shape("txt_in.weight")
    head = shape("double_blocks.0.img_attn.norm.query_norm.scale") or shape("single_blocks.0.norm.query_norm.scale")
    if img_in is None or txt_in is None or head is None:
        raise ModelError(f"{path}: not a whole Flux transformer (img_in / txt_in / QK norms missing)")
    hd, hidden = head[0], img_in[0]
    if hd == 128:
        axes = [16, 56, 56]
    else:
        a = 2 * max(1, hd // 16)
        b = (hd - a) // 4 * 2
        axes = [a, b, hd - a - b]
    vec = shape("vector_in.in_layer.weight")
    return dict(
        patch_size=1, in_channels=img_in[1], out_channels=None,
        num_layers=len({k.split(".")[1] for k in header.tensors if k.startswith(prefix + "double_blocks.")}),
        num_single_layers=len({k.split(".")[1] for k in header.tensors if k.startswith(prefix + "single_blocks.")}),
        attention_head_dim=hd, num_attention_heads=hidden // hd, joint_attention_dim=txt_in[1],
        pooled_projection_dim=vec[1] if vec else 768, guidance_embeds=shape("guidance_in.in_layer.weight") is not None,
        axes_dims_rope=axes,
    )


def from_single_file(base: FluxModel, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The transformer of a BFL file: the model (on the meta device) and its state dict, the
    fused q/k/v(/mlp) rows split and the swapped halves put back."""
    from diffusers import FluxTransformer2DModel

    if base.family != FLUX:
        raise ModelError(f"{base.path}: refinement builds {base.family} transformers from diffusers folders only")
    with torch.device("meta"):
        model = FluxTransformer2DModel(**flux_config(base))
    path = Path(base.path)
    header = base.headers[path]
    prefix = is_flux_keys(header.tensors) or ""
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    f = base._file(path)
    state = {}
    for e in bfl_file_plan(list(shapes.items()), prefix):
        if e.key not in header.tensors:
            raise ModelError(f"{path}: tensor '{e.key}' that the transformer needs is missing")
        t = f.get(e.key).to(dtype)
        if e.swap:
            a, b = t.chunk(2)
            t = torch.cat([b, a])
        at = 0
        for name in e.sources:
            n = shapes[name][0]
            state[name] = t[at:at + n]
            at += n
    return model, state


# ------------------------------------------------------------------------------ conditioning


def text_encoders(base: FluxModel, root: Path) -> list[tuple[str, str, str]]:
    """(role, encoder folder, tokenizer folder) of the pipeline folder `root`: FLUX.1 CLIP-L and T5,
    Chroma T5 alone."""
    if base.family == CHROMA:
        return [("t5", "text_encoder", "tokenizer")]
    return [("clip", "text_encoder", "tokenizer"), ("t5", "text_encoder_2", "tokenizer_2")]


def encoder_components(base) -> list[tuple[str, bool]]:
    """(component, drop the last layer) of the encoders a single file may embed (ComfyUI's
    all-in-one `text_encoders.clip_l.*` and `text_encoders.t5xxl.*`): CLIP-L, T5."""
    return [("text_encoder", False), (T5, False)]


def context_width(encoders: list[tuple[str, int]]) -> int:
    """Context width the encoders [(role, hidden)] give: T5's states (CLIP gives the pooled input)."""
    return sum(h for role, h in encoders if role == "t5")


def take(role: str, out, count: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(context part, pooled) of one encoder's output: T5's states are the context, CLIP gives the
    pooled projection's input."""
    if role == "t5":
        return out.last_hidden_state, None
    return None, out.pooler_output


def signature(config, names: frozenset[str]) -> dict | None:
    """The inputs a Flux / Chroma transformer's forward takes (None for another denoiser)."""
    if "img_ids" not in names:
        return None
    return dict(channels=config["in_channels"], context_dim=config["joint_attention_dim"],
                pooled_dim=config.get("pooled_projection_dim") if "pooled_projections" in names else None,
                time_ids=False, guidance=bool(config.get("guidance_embeds")) and "guidance" in names, accepts=names)


def noise(sig, n: int, resolution: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed latent noise [n, (R/2)^2, C] and flow times in (0, 1], drawn from `g` in this order."""
    x = torch.randn(n, (resolution // 2) ** 2, sig.channels, generator=g)
    t = 1.0 - torch.rand(n, generator=g)  # (0, 1]
    return x, t


def inputs(sig, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None,
           resolution: int, dev, device: str) -> dict:
    """The forward's keywords (`dev` moves a tensor to the model's device and dtype)."""
    h = resolution // 2
    img_ids = torch.zeros(h, h, 3)
    img_ids[..., 1] = torch.arange(h).view(h, 1)
    img_ids[..., 2] = torch.arange(h).view(1, h)
    kw = dict(hidden_states=dev(x), encoder_hidden_states=dev(hidden), timestep=dev(t),
              img_ids=dev(img_ids.reshape(-1, 3)), txt_ids=dev(torch.zeros(hidden.shape[1], 3)))
    if sig.pooled_dim and "pooled_projections" in sig.accepts:
        kw["pooled_projections"] = dev(pooled)
    if sig.guidance:
        kw["guidance"] = dev(torch.full((x.shape[0],), GUIDANCE))
    return kw
