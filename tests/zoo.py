"""Tiny REAL diffusers / transformers models of each family (SD1.5, SDXL, SSD-1B block structure,
small widths), saved as diffusers pipeline folders or as single files laid out by our own
diffusers -> LDM/SGM map; the tiny FLUX.1 transformer config and its BFL layout; and LoRA files
read the way a client reads them (no prolora reader). Shared by the tests:
`from zoo import build, save_pipeline, ...`.

diffusers and transformers are imported only when a model is built, so importing this module
costs nothing where they are missing (tests that need them importorskip first).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

SD15_UNET = dict(
    sample_size=16, block_out_channels=[32, 64, 64, 64], layers_per_block=2, cross_attention_dim=32,
    attention_head_dim=4, norm_num_groups=8,
)  # defaults: CrossAttnDown x3 + DownBlock2D, conv proj_in
SDXL_UNET = dict(
    sample_size=16, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[32, 64, 64],
    layers_per_block=2, cross_attention_dim=96, attention_head_dim=[2, 4, 4], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 48,
    transformer_layers_per_block=[1, 1, 2], norm_num_groups=8,
)
SSD_UNET = dict(SDXL_UNET, transformer_layers_per_block=[1, 2, 2], mid_block_type="UNetMidBlock2D",
                reverse_transformer_layers_per_block=[[2, 2, 3], [2, 1, 1], [1, 1, 1]])
TE1 = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, vocab_size=1000,
           max_position_embeddings=77)
TE2 = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3, vocab_size=1000,
           max_position_embeddings=77, projection_dim=48)
# kind -> (UNet2DConditionModel config, {component: (transformers class name, CLIPTextConfig fields)})
SPECS = {
    "sd15": (SD15_UNET, {"text_encoder": ("CLIPTextModel", TE1)}),
    "sdxl": (SDXL_UNET, {"text_encoder": ("CLIPTextModel", TE1),
                         "text_encoder_2": ("CLIPTextModelWithProjection", TE2)}),
    "ssd": (SSD_UNET, {"text_encoder": ("CLIPTextModel", TE1),
                       "text_encoder_2": ("CLIPTextModelWithProjection", TE2)}),
}
FAMILY = {"sd15": "sd1", "sdxl": "sdxl", "ssd": "ssd-1b"}  # what prolora should detect
# a tiny FLUX.1-dev FluxTransformer2DModel (guidance_in, pooled CLIP-L input): width FLUX_H, MLP FLUX_MLP
FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
FLUX_H, FLUX_MLP = 32, 128


def build(kind: str, seed: int) -> dict[str, torch.nn.Module]:
    """{component: module} with random weights (torch's default init, seeded), in eval mode."""
    import transformers
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    unet_cfg, tes = SPECS[kind]
    mods = {"unet": UNet2DConditionModel(**unet_cfg)}
    for comp, (cls, cfg) in tes.items():
        mods[comp] = getattr(transformers, cls)(CLIPTextConfig(**cfg))
    return {k: m.eval() for k, m in mods.items()}


def state(mods) -> dict[str, dict[str, torch.Tensor]]:
    """{component: state dict} (detached copies)."""
    return {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in mods.items()}


def load_state(kind: str, st: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.nn.Module]:
    """Modules of `kind` holding the given state dicts (e.g. a perturbed copy of a source)."""
    mods = build(kind, seed=0)
    for comp, m in mods.items():
        m.load_state_dict(st[comp], strict=True)
    return mods


def save_pipeline(mods, folder: Path, **kw) -> Path:
    """A diffusers pipeline folder: model_index.json plus one save_pretrained folder per component."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionXLPipeline" if "text_encoder_2" in mods else "StableDiffusionPipeline"}
    for comp, m in mods.items():
        m.save_pretrained(folder / comp, **kw)
        index[comp] = ["diffusers" if comp == "unet" else "transformers", type(m).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def write_single_file(st, path: Path, components=("unet", "text_encoder", "text_encoder_2"),
                      prefix_override: str | None = None) -> Path:
    """A single .safetensors file laid out by OUR diffusers -> LDM/SGM map."""
    from prolora.families.sd.read import single_file_plan
    from prolora.safetensors_io import save

    params = {c: [(k, tuple(v.shape)) for k, v in st[c].items()] for c in components if c in st}
    tensors = {}
    for e in single_file_plan(params):
        parts = [st[c][n] for c, n in e.sources]
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        key = e.key if prefix_override is None else e.key.replace("model.diffusion_model.", prefix_override, 1)
        tensors[key] = (t.t() if e.transpose else t).contiguous()
    save(path, tensors)
    return path


def bfl_tensors(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers Flux state dict in BFL layout, by our plan."""
    from prolora.families.flux.keys import bfl_file_plan

    out = {}
    for e in bfl_file_plan([(k, tuple(v.shape)) for k, v in sd.items()], prefix):
        t = torch.cat([sd[n] for n in e.sources])
        if e.swap:
            a, b = t.chunk(2)
            t = torch.cat([b, a])
        out[e.key] = t.contiguous()
    return out


def canon(name: str) -> str:
    """transformers 5 saves CLIPTextModel without the `text_model.` root; canonical ids keep it."""
    return "text_model." + name if name.startswith(("embeddings.", "encoder.", "final_layer_norm.")) else name


def module_name(model: torch.nn.Module, canonical: str) -> str:
    """The model's own name for a canonical (`text_model.`-rooted) path inside its component."""
    if canonical.startswith("text_model.") and not hasattr(model, "text_model"):
        return canonical[len("text_model."):]
    return canonical


# the down/up suffixes LoRA files use: kohya/ComfyUI, PEFT, DiffSynth-Studio's PEFT, XLabs
LORA_SUFFIXES = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
                 (".lora_A.default.weight", ".lora_B.default.weight"), (".down.weight", ".up.weight"))


def lora_pairs(tensors: dict[str, torch.Tensor]):
    """(module stem, down, up) in float64 for every down/up pair of a LoRA state dict, read the way
    a client would, independently of prolora's own readers (the client tests' parsers use it)."""
    for key in tensors:
        for down_s, up_s in LORA_SUFFIXES:
            if key.endswith(down_s):
                stem = key[: -len(down_s)]
                yield stem, tensors[key].double(), tensors[stem + up_s].double()
                break


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, read with the safetensors library."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def peft_value(cfg: dict, field: str, pattern_field: str, name: str):
    """peft's rule: the first `pattern_field` key matching `(.*\\.)?(KEY)$`, else `field`."""
    for key, value in (cfg.get(pattern_field) or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return cfg[field]
