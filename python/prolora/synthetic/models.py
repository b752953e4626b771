"""Deterministic synthetic base models and LoRAs in real layouts (no diffusers needed).

Used by `prolora demo`, the tests and the benchmarks. Parameter names and shapes follow diffusers'
UNet2DConditionModel and transformers' CLIP text encoders exactly (checked against them in
tests/test_synthetic.py); weights get spectra like trained ones: sigma_1/sigma_{d/4} in 2.8-3.2
and 90% of the sigma^2 energy in 43-59% of the directions, with random orthogonal factors (for
convs on the (out, in*kh*kw) view). A TARGET model is a source plus a fine-tune-like perturbation.
Files are written one tensor at a time (StreamingWriter), never the whole model in memory.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Union

import torch

from ..safetensors_io import StreamingWriter

Params = list[tuple[str, tuple[int, ...]]]

# ----------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text encoder (transformers CLIPTextModel[WithProjection] shapes)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int = 49408
    max_positions: int = 77
    projection: int | None = None  # CLIPTextModelWithProjection's text_projection width
    openclip: bool = False  # stored OpenCLIP-style (fused q/k/v) in single files
    act: str = "quick_gelu"


@dataclass(frozen=True)
class ModelConfig:
    """A whole base model: a UNet2DConditionModel config and its text encoders."""

    family: str
    unet: dict
    text_encoders: dict[str, TextEncoderConfig] = field(default_factory=dict)


_SDXL_UNET = dict(
    sample_size=128, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[320, 640, 1280],
    layers_per_block=2, attention_head_dim=[5, 10, 20], cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
_CLIP_L = TextEncoderConfig(hidden=768, layers=12, intermediate=3072, heads=12)
_CLIP_G = TextEncoderConfig(hidden=1280, layers=32, intermediate=5120, heads=20, projection=1280, openclip=True, act="gelu")

PRESETS: dict[str, ModelConfig] = {
    "sd15": ModelConfig("sd1", dict(sample_size=64, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                                    attention_head_dim=8), {"text_encoder": _CLIP_L}),
    "sd2": ModelConfig("sd2", dict(sample_size=96, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024,
                                   attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
                       {"text_encoder": TextEncoderConfig(hidden=1024, layers=23, intermediate=4096, heads=16,
                                                          openclip=True, act="gelu")}),
    "sdxl": ModelConfig("sdxl", _SDXL_UNET, {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G}),
    "ssd-1b": ModelConfig("ssd-1b", dict(_SDXL_UNET, transformer_layers_per_block=[1, 2, 4],
                                         reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]],
                                         mid_block_type="UNetMidBlock2D"),
                          {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G}),
}
SCALES = {"full": (1.0, 1.0), "small": (0.25, 0.5), "tiny": (0.1, 0.2)}  # (width, depth)


def _round32(x: float) -> int:
    return max(32, 32 * round(x / 32))


def shrink(cfg: ModelConfig, width: float = 1.0, depth: float = 1.0) -> ModelConfig:
    """The same structure with fewer channels and transformer blocks.

    Channels are scaled by `width` (multiples of 32, so group norms still divide), transformer
    depths and text-encoder layers by `depth` (at least 1, so no block disappears and uneven
    depths such as SSD-1B's stay uneven). Levels, resnets per level and block types are kept.
    """
    if width == 1.0 and depth == 1.0:
        return cfg
    d = lambda n: max(1, round(n * depth))  # noqa: E731
    tes = {}
    for name, te in cfg.text_encoders.items():
        h = _round32(te.hidden * width)
        tes[name] = replace(te, hidden=h, layers=d(te.layers), intermediate=4 * h, heads=max(1, h // 32),
                            vocab=min(te.vocab, 1000), projection=h if te.projection else None)
    u = dict(cfg.unet)
    chans = [_round32(c * width) for c in u["block_out_channels"]]
    u["block_out_channels"] = chans
    u["attention_head_dim"] = [max(1, c // 32) for c in chans]
    deep = lambda v: [deep(x) for x in v] if isinstance(v, list) else d(v)  # noqa: E731
    for k in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
        if isinstance(u.get(k), (list, int)):
            u[k] = deep(u[k])
    if tes:
        u["cross_attention_dim"] = sum(te.hidden for te in tes.values())
    if u.get("addition_embed_type") == "text_time":
        t = max(8, _round32(u["addition_time_embed_dim"] * width) // 4)
        u["addition_time_embed_dim"] = t
        u["projection_class_embeddings_input_dim"] = 6 * t + tes["text_encoder_2"].projection
    u["sample_size"] = 32
    return ModelConfig(cfg.family, u, tes)


@dataclass(frozen=True)
class FluxConfig:
    """A Flux transformer: diffusers' FluxTransformer2DModel config fields (FLUX.1 at full size:
    19 double + 38 single blocks, 24 heads of 128, MLP ratio 4 as in diffusers). guidance_embeds:
    FLUX.1-dev has the guidance embedder, schnell does not."""

    family: str = "flux"
    num_layers: int = 19
    num_single_layers: int = 38
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 64
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)

    @property
    def hidden(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def diffusers_config(self) -> dict:
        """config.json of the transformer folder (what FluxTransformer2DModel(**...) takes)."""
        d = {k: v for k, v in asdict(self).items() if k != "family"}
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0", "patch_size": 1,
                "out_channels": None, **d}


FLUX_PRESETS: dict[str, FluxConfig] = {"flux-dev": FluxConfig(), "flux-schnell": FluxConfig(guidance_embeds=False)}
# scale -> (double blocks, single blocks, heads, head dim, in channels, joint dim, pooled dim, rope axes)
FLUX_SCALES = {
    "full": None,
    "small": (5, 10, 6, 64, 64, 512, 128, (8, 28, 28)),
    "tiny": (2, 4, 2, 16, 16, 32, 32, (4, 6, 6)),
}


def flux_config(name: str = "flux-dev", scale: str = "full", blocks: tuple[int, int] | None = None) -> FluxConfig:
    """A Flux preset ("flux-dev", "flux-schnell") at "full", "small" (h=384) or "tiny" (h=32)
    width, optionally with `blocks` = (double, single) blocks instead of the scale's."""
    if name not in FLUX_PRESETS:
        raise ValueError(f"unknown Flux preset {name!r}; choose one of {sorted(FLUX_PRESETS)}")
    if scale not in FLUX_SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(FLUX_SCALES)}")
    cfg = FLUX_PRESETS[name]
    if FLUX_SCALES[scale] is not None:
        d, s_, heads, hd, cin, joint, pooled, axes = FLUX_SCALES[scale]
        cfg = replace(cfg, num_layers=d, num_single_layers=s_, num_attention_heads=heads, attention_head_dim=hd,
                      in_channels=cin, joint_attention_dim=joint, pooled_projection_dim=pooled, axes_dims_rope=axes)
    if blocks is not None:
        cfg = replace(cfg, num_layers=int(blocks[0]), num_single_layers=int(blocks[1]))
    return cfg


def preset(name: str, scale: str = "full") -> "ModelConfig | FluxConfig":
    """A named configuration ("sd15", "sd2", "sdxl", "ssd-1b", "flux-dev", "flux-schnell") at
    "full", "small" or "tiny" size."""
    if name in FLUX_PRESETS:
        return flux_config(name, scale)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS) + sorted(FLUX_PRESETS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    return shrink(PRESETS[name], *SCALES[scale])


# ----------------------------------------------------------------------------- parameter lists

_UNET_DEFAULTS = dict(
    in_channels=4, out_channels=4, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=1280,
    transformer_layers_per_block=1, reverse_transformer_layers_per_block=None, attention_head_dim=8,
    num_attention_heads=None, use_linear_projection=False, addition_embed_type=None, addition_time_embed_dim=None,
    projection_class_embeddings_input_dim=None, time_embedding_dim=None, conv_in_kernel=3, conv_out_kernel=3,
)
# config keys that change no parameter shape
_SHAPELESS = {"sample_size", "center_input_sample", "flip_sin_to_cos", "freq_shift", "downsample_padding",
              "mid_block_scale_factor", "dropout", "act_fn", "norm_num_groups", "norm_eps", "upcast_attention",
              "resnet_out_scale_factor", "_class_name", "_diffusers_version", "_name_or_path"}


class _P(list):
    """A growing parameter list with the module helpers diffusers' blocks are made of."""

    def linear(self, name: str, out: int, inp: int, bias: bool = True) -> None:
        self.append((f"{name}.weight", (out, inp)))
        if bias:
            self.append((f"{name}.bias", (out,)))

    def conv(self, name: str, out: int, inp: int, k: int) -> None:
        self += [(f"{name}.weight", (out, inp, k, k)), (f"{name}.bias", (out,))]

    def norm(self, name: str, ch: int) -> None:
        self += [(f"{name}.weight", (ch,)), (f"{name}.bias", (ch,))]

    def resnet(self, name: str, inp: int, out: int, temb: int) -> None:
        self.norm(f"{name}.norm1", inp)
        self.conv(f"{name}.conv1", out, inp, 3)
        self.linear(f"{name}.time_emb_proj", out, temb)
        self.norm(f"{name}.norm2", out)
        self.conv(f"{name}.conv2", out, out, 3)
        if inp != out:
            self.conv(f"{name}.conv_shortcut", out, inp, 1)

    def transformer(self, name: str, ch: int, heads: int, depth: int, cross: int, linear_proj: bool) -> None:
        inner = heads * (ch // heads)
        self.norm(f"{name}.norm", ch)
        proj = (lambda n, o, i: self.linear(n, o, i)) if linear_proj else (lambda n, o, i: self.conv(n, o, i, 1))
        proj(f"{name}.proj_in", inner, ch)
        for t in range(depth):
            b = f"{name}.transformer_blocks.{t}"
            for a, kv in (("attn1", inner), ("attn2", cross)):
                self.norm(f"{b}.norm{a[-1]}", inner)
                self.linear(f"{b}.{a}.to_q", inner, inner, bias=False)
                self.linear(f"{b}.{a}.to_k", inner, kv, bias=False)
                self.linear(f"{b}.{a}.to_v", inner, kv, bias=False)
                self.linear(f"{b}.{a}.to_out.0", inner, inner)
            self.norm(f"{b}.norm3", inner)
            self.linear(f"{b}.ff.net.0.proj", 8 * inner, inner)
            self.linear(f"{b}.ff.net.2", inner, 4 * inner)
        proj(f"{name}.proj_out", ch, inner)


def _per_level(v, n: int) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def unet_params(cfg: dict) -> Params:
    """(diffusers name, shape) of every UNet2DConditionModel parameter, in state_dict order.

    Supports the block types of SD1.x/SD2.x/SDXL/SSD-1B (CrossAttn/plain down and up blocks,
    cross-attention or resnet-only or no mid block, text_time added embedding).
    """
    unknown = set(cfg) - set(_UNET_DEFAULTS) - _SHAPELESS
    if unknown:
        raise ValueError(f"unet config keys not supported by the synthetic generator: {sorted(unknown)}")
    c = {**_UNET_DEFAULTS, **cfg}
    chans, L, n = list(c["block_out_channels"]), c["layers_per_block"], len(c["block_out_channels"])
    if not isinstance(L, int):
        raise ValueError("layers_per_block must be one int")
    heads = _per_level(c["num_attention_heads"] or c["attention_head_dim"], n)
    depth = _per_level(c["transformer_layers_per_block"], n)
    rdepth = c["reverse_transformer_layers_per_block"] or list(reversed(depth))
    cross, lin = c["cross_attention_dim"], c["use_linear_projection"]
    T = c["time_embedding_dim"] or chans[0] * 4
    p = _P()
    p.conv("conv_in", chans[0], c["in_channels"], c["conv_in_kernel"])
    p.linear("time_embedding.linear_1", T, chans[0])
    p.linear("time_embedding.linear_2", T, T)
    if c["addition_embed_type"] == "text_time":
        p.linear("add_embedding.linear_1", T, c["projection_class_embeddings_input_dim"])
        p.linear("add_embedding.linear_2", T, T)
    elif c["addition_embed_type"] is not None:
        raise ValueError(f"addition_embed_type {c['addition_embed_type']!r} not supported")
    out = chans[0]
    for i, kind in enumerate(c["down_block_types"]):
        inp, out = out, chans[i]
        name = f"down_blocks.{i}"
        if kind == "CrossAttnDownBlock2D":
            for j in range(L):
                d = depth[i][j] if isinstance(depth[i], list) else depth[i]
                p.transformer(f"{name}.attentions.{j}", out, heads[i], d, cross, lin)
        elif kind != "DownBlock2D":
            raise ValueError(f"down block type {kind!r} not supported")
        for j in range(L):
            p.resnet(f"{name}.resnets.{j}", inp if j == 0 else out, out, T)
        if i < n - 1:
            p.conv(f"{name}.downsamplers.0.conv", out, out, 3)
    mid = _P()
    if c["mid_block_type"] == "UNetMidBlock2DCrossAttn":
        d = depth[-1][-1] if isinstance(depth[-1], list) else depth[-1]
        mid.transformer("mid_block.attentions.0", chans[-1], heads[-1], d, cross, lin)
        mid.resnet("mid_block.resnets.0", chans[-1], chans[-1], T)
        mid.resnet("mid_block.resnets.1", chans[-1], chans[-1], T)
    elif c["mid_block_type"] == "UNetMidBlock2D":  # resnet only (SSD-1B)
        mid.resnet("mid_block.resnets.0", chans[-1], chans[-1], T)
    elif c["mid_block_type"] is not None:
        raise ValueError(f"mid block type {c['mid_block_type']!r} not supported")
    rev, rheads = list(reversed(chans)), list(reversed(heads))
    out = rev[0]
    for i, kind in enumerate(c["up_block_types"]):
        prev, out, inp = out, rev[i], rev[min(i + 1, n - 1)]
        name = f"up_blocks.{i}"
        if kind == "CrossAttnUpBlock2D":
            for j in range(L + 1):
                d = rdepth[i][j] if isinstance(rdepth[i], list) else rdepth[i]
                p.transformer(f"{name}.attentions.{j}", out, rheads[i], d, cross, lin)
        elif kind != "UpBlock2D":
            raise ValueError(f"up block type {kind!r} not supported")
        for j in range(L + 1):
            skip = inp if j == L else out
            p.resnet(f"{name}.resnets.{j}", (prev if j == 0 else out) + skip, out, T)
        if i < n - 1:
            p.conv(f"{name}.upsamplers.0.conv", out, out, 3)
    p += mid
    p.norm("conv_norm_out", chans[0])
    p.conv("conv_out", c["out_channels"], chans[0], c["conv_out_kernel"])
    return list(p)


def clip_params(te: TextEncoderConfig) -> Params:
    """(transformers name, shape) of a CLIP text encoder, `text_model.`-rooted, state_dict order."""
    h = te.hidden
    p = _P()
    p.append(("text_model.embeddings.token_embedding.weight", (te.vocab, h)))
    p.append(("text_model.embeddings.position_embedding.weight", (te.max_positions, h)))
    for i in range(te.layers):
        b = f"text_model.encoder.layers.{i}"
        for x in ("k", "v", "q", "out"):
            p.linear(f"{b}.self_attn.{x}_proj", h, h)
        p.norm(f"{b}.layer_norm1", h)
        p.linear(f"{b}.mlp.fc1", te.intermediate, h)
        p.linear(f"{b}.mlp.fc2", h, te.intermediate)
        p.norm(f"{b}.layer_norm2", h)
    p.norm("text_model.final_layer_norm", h)
    if te.projection:
        p.linear("text_projection", te.projection, h, bias=False)
    return list(p)


def flux_params(cfg: FluxConfig) -> Params:
    """(diffusers name, shape) of every FluxTransformer2DModel parameter, in state_dict order."""
    h = cfg.hidden
    mlp = 4 * h
    hd = cfg.attention_head_dim
    p = _P()
    p.linear("time_text_embed.timestep_embedder.linear_1", h, 256)
    p.linear("time_text_embed.timestep_embedder.linear_2", h, h)
    if cfg.guidance_embeds:
        p.linear("time_text_embed.guidance_embedder.linear_1", h, 256)
        p.linear("time_text_embed.guidance_embedder.linear_2", h, h)
    p.linear("time_text_embed.text_embedder.linear_1", h, cfg.pooled_projection_dim)
    p.linear("time_text_embed.text_embedder.linear_2", h, h)
    p.linear("context_embedder", h, cfg.joint_attention_dim)
    p.linear("x_embedder", h, cfg.in_channels)
    for i in range(cfg.num_layers):
        b = f"transformer_blocks.{i}"
        p.linear(f"{b}.norm1.linear", 6 * h, h)
        p.linear(f"{b}.norm1_context.linear", 6 * h, h)
        p += [(f"{b}.attn.norm_q.weight", (hd,)), (f"{b}.attn.norm_k.weight", (hd,))]
        for x in ("to_q", "to_k", "to_v", "to_out.0"):
            p.linear(f"{b}.attn.{x}", h, h)
        p += [(f"{b}.attn.norm_added_q.weight", (hd,)), (f"{b}.attn.norm_added_k.weight", (hd,))]
        for x in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            p.linear(f"{b}.attn.{x}", h, h)
        for ff in ("ff", "ff_context"):
            p.linear(f"{b}.{ff}.net.0.proj", mlp, h)
            p.linear(f"{b}.{ff}.net.2", h, mlp)
    for i in range(cfg.num_single_layers):
        b = f"single_transformer_blocks.{i}"
        p.linear(f"{b}.norm.linear", 3 * h, h)
        p.linear(f"{b}.proj_mlp", mlp, h)
        p.linear(f"{b}.proj_out", h, h + mlp)
        p += [(f"{b}.attn.norm_q.weight", (hd,)), (f"{b}.attn.norm_k.weight", (hd,))]
        for x in ("to_q", "to_k", "to_v"):
            p.linear(f"{b}.attn.{x}", h, h)
    p.linear("norm_out.linear", 2 * h, h)
    p.linear("proj_out", cfg.in_channels, h)
    return list(p)


def model_params(cfg: "ModelConfig | FluxConfig") -> dict[str, Params]:
    """{component: params}: the UNet and every text encoder, or Flux's transformer."""
    if isinstance(cfg, FluxConfig):
        return {"transformer": flux_params(cfg)}
    out = {"unet": unet_params(cfg.unet)}
    out.update({name: clip_params(te) for name, te in cfg.text_encoders.items()})
    return out


# ----------------------------------------------------------------------------- tensor values


def _generator(*parts: object) -> torch.Generator:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def spectrum(d: int, g: torch.Generator) -> torch.Tensor:
    """d singular values, decreasing, shaped like trained weights (see module doc).

    s(x) = (1 + x/c)^-p (1 - 0.97x)^q at x = (i + 1/2)/d, with c, q drawn per weight and p solved
    (in closed form) so that s_0 / s_{d/4} equals a ratio drawn from [2.8, 3.2].
    """
    u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
    ratio, c, q = 2.8 + 0.4 * u[0], 0.04 + 0.02 * u[1], 0.2 + 0.2 * u[2]
    x = (torch.arange(d, dtype=torch.float64) + 0.5) / d
    x0, xq = x[0].item(), x[d // 4].item()
    tail = ((1 - 0.97 * xq) / (1 - 0.97 * x0)) ** q
    p = max(0.0, math.log(ratio * tail) / math.log((1 + xq / c) / (1 + x0 / c))) if d >= 4 else 0.0
    return (1 + x / c) ** (-p) * (1 - 0.97 * x) ** q


def _orthonormal(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """n x d with orthonormal columns, Haar-distributed: the Q of a Gaussian's QR (R > 0 diagonal).

    Computed as Cholesky-QR (Q = G R^-1, R = chol(G^T G)), several times faster than Householder
    on CPU; in float64 when G is near-square (ill-conditioned), float32 when n >= 2d (cond <= 6).
    """
    gauss = torch.randn(n, d, generator=g)
    work = gauss if n >= 2 * d else gauss.double()
    try:
        r = torch.linalg.cholesky(work.T @ work, upper=True)
        return torch.linalg.solve_triangular(r, work, upper=True, left=False).float()
    except RuntimeError:  # numerically singular Gram matrix: fall back to Householder
        q, r = torch.linalg.qr(gauss.double())
        return (q * torch.sign(torch.diagonal(r))).float()


def spectral_weight(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A float32 weight U diag(s) V^T with `spectrum` values and entries of RMS 1/sqrt(fan_in)."""
    m, n = shape[0], math.prod(shape[1:])
    d = min(m, n)
    s = spectrum(d, g)
    s = (s * math.sqrt(m) / s.norm()).float()
    w = (_orthonormal(m, d, g) * s) @ _orthonormal(n, d, g).T
    return w.reshape(shape)


def _is_lora_weight(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".weight") and len(shape) in (2, 4) and ".embeddings." not in name


def source_tensor(component: str, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The float32 value of one source parameter (depends only on seed, component and name)."""
    g = _generator("source", seed, component, name)
    if _is_lora_weight(name, shape):
        return spectral_weight(shape, g)
    t = torch.randn(shape, generator=g)
    if ".embeddings." in name:
        return 0.02 * t
    if name.endswith(".bias"):
        return 0.01 * t
    return 1.0 + 0.05 * t  # norm scales


@dataclass(frozen=True)
class Perturbation:
    """How a target differs from its source, per weight: dW = size * ||W||_F * unit(drift + noise).

    The drift is a random product of rank max(1, d * rank_fraction), the noise dense Gaussian;
    `noise_fraction` is the noise's share of the energy. At the default size 0.1 the top-(d/2)
    subspaces keep phi ~ 0.96-0.98 for square weights and ~0.98-0.995 on the short side of 4:1
    ones; at 0.05, ~0.985-0.995; larger sizes go lower.
    """

    size: float = 0.1
    rank_fraction: float = 1 / 16
    noise_fraction: float = 0.2
    seed: int = 1


def perturb(w: torch.Tensor, name: str, p: Perturbation) -> torch.Tensor:
    """w + a fine-tune-like change of relative Frobenius size p.size (float32)."""
    g = _generator("target", p.seed, name)
    m, n = w.shape[0], w[0].numel()
    r = max(1, round(min(m, n) * p.rank_fraction))
    drift = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    noise = torch.randn(m, n, generator=g)
    dw = math.sqrt(1 - p.noise_fraction) * drift / drift.norm() + math.sqrt(p.noise_fraction) * noise / noise.norm()
    dw *= p.size * w.norm() / dw.norm()
    return w + dw.reshape(w.shape)


# ----------------------------------------------------------------------------- writing models

ConfigLike = Union[ModelConfig, FluxConfig, str]


def _config(cfg: ConfigLike) -> "ModelConfig | FluxConfig":
    if isinstance(cfg, (ModelConfig, FluxConfig)):
        return cfg
    name, _, scale = cfg.partition(":")
    return preset(name, scale or "full")


def _unet_config_json(cfg: ModelConfig) -> dict:
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0", **_UNET_DEFAULTS, **cfg.unet}


def _clip_config_json(te: TextEncoderConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["CLIPTextModelWithProjection" if te.projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "hidden_size": te.hidden, "intermediate_size": te.intermediate,
        "num_attention_heads": te.heads, "num_hidden_layers": te.layers, "vocab_size": te.vocab,
        "max_position_embeddings": te.max_positions, "projection_dim": te.projection or te.hidden,
        "hidden_act": te.act, "layer_norm_eps": 1e-5, "torch_dtype": str(dtype).replace("torch.", ""),
    }


class _Values:
    """Produces each parameter's value: the source's, or source + perturbation for a target."""

    def __init__(self, seed: int, base, perturbation: Perturbation):
        self.seed, self.base, self.p = seed, base, perturbation

    def __call__(self, component: str, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if self.base is None:
            return source_tensor(component, name, shape, self.seed)
        if not _is_lora_weight(name, shape):
            return source_tensor(component, name, shape, self.seed)
        module = f"{component}.{name[: -len('.weight')]}"
        ref = self.base.weights.get(module)
        if ref is None or tuple(ref.shape) != tuple(shape):
            have = None if ref is None else tuple(ref.shape)
            raise ValueError(f"base model {self.base.path} does not match the config at '{module}': {have} vs {shape}")
        return perturb(self.base.load(module), module, self.p)


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with n torch threads, restoring the previous count (small matrices run faster on one
    thread, and far faster when other processes compete for the cores)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _write_file(path: Path, items: list[tuple[str, tuple[int, ...], object]], dtype: torch.dtype,
                metadata: dict[str, str]) -> None:
    """items: (key, shape, callable producing a float tensor); written one by one."""
    entries = [(k, dtype, s) for k, s, _ in items]
    with StreamingWriter(path, entries, metadata) as w:
        for key, _, make in items:
            w.write(key, make().to(dtype).contiguous())


def write_model(path: str | os.PathLike, cfg: ConfigLike = "sdxl:tiny", layout: str = "diffusers",
                dtype: torch.dtype = torch.float16, seed: int = 0, base=None,
                perturbation: Perturbation | float = Perturbation(), threads: int | None = None,
                shard_bytes: int = 10 * 2**30) -> Path:
    """Write a synthetic base model; returns its path.

    `cfg`: a ModelConfig / FluxConfig or a preset name ("sdxl", "sd15:tiny", "ssd-1b:small",
    "flux-dev", "flux-schnell:tiny", ...).
    `layout`: "diffusers" (a pipeline folder at `path`; Flux: transformer/ in shards of at most
    `shard_bytes`, with an index) or "single-file" (one .safetensors file; Flux: BFL keys), and for
    Flux "single-file-prefixed" (BFL keys under ComfyUI's `model.diffusion_model.`).
    `base`: a source model (path or BaseModel) written earlier with the same config and seed;
    the result is then a TARGET: each source weight plus a `perturbation` (relative Frobenius
    size, or a Perturbation); other parameters equal the source's.
    `threads`: torch threads while generating (default: 1 below 100M parameters, else torch's).
    """
    from ..checkpoints import BaseModel, open_model

    cfg = _config(cfg)
    layouts = ("diffusers", "single-file") + (("single-file-prefixed",) if isinstance(cfg, FluxConfig) else ())
    if layout not in layouts:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(layouts)}")
    if isinstance(perturbation, (int, float)):
        perturbation = Perturbation(size=float(perturbation))
    path = Path(path)
    params = model_params(cfg)
    opened = None
    if base is not None and not isinstance(base, BaseModel):
        base = opened = open_model(base)
    values = _Values(seed, base, perturbation)
    meta = {"prolora.synthetic": json.dumps({"family": cfg.family, "seed": seed,
                                             "target_of": base.identity() if base is not None else None,
                                             "perturbation": asdict(perturbation) if base is not None else None})}
    if threads is None:
        threads = 1 if sum(math.prod(s) for plist in params.values() for _, s in plist) < 100_000_000 else 0
    try:
        with _threads(threads):
            if isinstance(cfg, FluxConfig):
                _write_flux(path, cfg, params["transformer"], layout, values, dtype, meta, shard_bytes)
            else:
                _write_layout(path, cfg, params, layout, values, dtype, meta)
    finally:
        if opened is not None:
            opened.close()
    return path


def _write_layout(path: Path, cfg: ModelConfig, params: dict[str, Params], layout: str, values: _Values,
                  dtype: torch.dtype, meta: dict[str, str]) -> None:
    from ..checkpoints.single_file import single_file_plan

    if layout == "single-file":
        openclip = cfg.text_encoders.get("text_encoder", _CLIP_L).openclip
        shapes = {c: dict(plist) for c, plist in params.items()}
        items = []
        for e in single_file_plan(params, openclip_te1=openclip):
            def make(e=e):
                parts = [values(c, n, shapes[c][n]) for c, n in e.sources]
                t = torch.cat(parts) if len(parts) > 1 else parts[0]
                return t.t() if e.transpose else t
            items.append((e.key, e.shape, make))
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(path, items, dtype, meta)
    elif layout == "diffusers":
        path.mkdir(parents=True, exist_ok=True)
        index = {"_class_name": "StableDiffusionXLPipeline" if "text_encoder_2" in params else "StableDiffusionPipeline",
                 "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"]}
        for comp, plist in params.items():
            folder = path / comp
            folder.mkdir(exist_ok=True)
            if comp == "unet":
                conf, fname = _unet_config_json(cfg), "diffusion_pytorch_model.safetensors"
            else:
                te = cfg.text_encoders[comp]
                conf, fname = _clip_config_json(te, dtype), "model.safetensors"
                index[comp] = ["transformers", conf["architectures"][0]]
            (folder / "config.json").write_text(json.dumps(conf, indent=2))
            items = [(n, s, (lambda c=comp, n=n, s=s: values(c, n, s))) for n, s in plist]
            _write_file(folder / fname, items, dtype, meta)
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
    else:
        raise ValueError(f"unknown layout {layout!r}; use 'diffusers' or 'single-file'")


def _write_flux(path: Path, cfg: FluxConfig, params: Params, layout: str, values: _Values, dtype: torch.dtype,
                meta: dict[str, str], shard_bytes: int) -> None:
    """Flux in BFL single-file layout (q, k, v[, mlp] concatenated, final modulation halves
    swapped) or as a diffusers pipeline folder with a sharded transformer/."""
    from ..checkpoints.flux import COMPONENT, bfl_file_plan

    shapes = dict(params)
    if layout.startswith("single-file"):
        prefix = "model.diffusion_model." if layout == "single-file-prefixed" else ""
        items = []
        for e in bfl_file_plan(params, prefix):
            def make(e=e):
                parts = [values(COMPONENT, n, shapes[n]) for n in e.sources]
                t = torch.cat(parts) if len(parts) > 1 else parts[0]
                if e.swap:
                    a, b = t.chunk(2)
                    t = torch.cat([b, a])
                return t
            items.append((e.key, e.shape, make))
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(path, items, dtype, meta)
        return
    folder = path / COMPONENT
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.diffusers_config(), indent=2))
    itemsize = torch.tensor([], dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in params:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    n = len(shards)
    base = "diffusion_pytorch_model"
    if n == 1:
        names = [f"{base}.safetensors"]
    else:
        names = [f"{base}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, shard in zip(names, shards):
        items = [(k, s, (lambda k=k, s=s: values(COMPONENT, k, s))) for k, s in shard]
        _write_file(folder / fname, items, dtype, meta)
        weight_map.update({k: fname for k, _ in shard})
    if n > 1:
        total = sum(math.prod(s) * itemsize for _, s in params)
        (folder / f"{base}.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
         "transformer": ["diffusers", "FluxTransformer2DModel"]}, indent=2))


# ----------------------------------------------------------------------------- LoRAs

_ATTN = (".attn1.", ".attn2.", ".self_attn.")


def lora_targets(modules, targets: str = "transformer", conv: bool = False) -> Iterator[str]:
    """Canonical module ids a LoRA of this kind adapts (text_projection never).

    "attn": attention projections (UNet attn1/attn2, text-encoder self_attn);
    "transformer": every linear (and 1x1 conv) in UNet transformers plus all text-encoder layer
    linears, like kohya's defaults; "all": also resnets, time embeddings, samplers, conv_in/out
    (3x3 convs only with conv=True).
    """
    if targets not in ("attn", "transformer", "all"):
        raise ValueError(f"unknown targets {targets!r}; use 'attn', 'transformer' or 'all'")
    for module, ref in modules.items():
        if module.endswith("text_projection"):
            continue
        is_te = not module.startswith("unet.")
        k3 = len(ref.shape) == 4 and ref.shape[2:] != (1, 1)
        if k3 and not conv:
            continue
        if targets == "attn":
            ok = any(a in module for a in _ATTN)
        elif targets == "transformer":
            ok = is_te or ".attentions." in module
        else:
            ok = True
        if ok:
            yield module


def write_lora(model, path: str | os.PathLike, format: str = "kohya", rank: int = 4, alpha: float | None = None,
               targets: str = "transformer", seed: int = 0, conv: bool = False, size: float = 0.05,
               split_qkv: bool = False, spelling: str | None = None) -> Path:
    """Write a synthetic LoRA for `model` (a path or BaseModel); returns `path`.

    Keys are spelled for `format` through the model (kohya: the family's kohya spelling). Each
    module's delta scale * up @ down has Frobenius norm about `size` * sqrt(out), i.e. `size`
    relative to the synthetic weights. alpha defaults to rank / 2 (scale 0.5).

    Flux: formats kohya (BFL names; `spelling="kohya-diffusers"` for `lora_transformer_` names),
    comfy, xlabs and peft. kohya/comfy/xlabs modules are the fused BFL ones (one down for q, k, v
    [and mlp]); `split_qkv` writes them in kohya's split_qkv form (a rank-`rank` pair per slice:
    down [n*rank, in], block-diagonal up). targets: "attn" (attention projections), "transformer"
    (every linear of the double and single blocks, kohya's default), "all" (also the embedders,
    guidance_in and the final layer); XLabs files hold only what XLabs can name.
    """
    from ..checkpoints import BaseModel, open_model
    from ..formats import write_lora as write_lora_file
    from ..lora import LoraFile, LoraModule

    opened = None if isinstance(model, BaseModel) else open_model(model)
    m = opened or model
    try:
        if m.family == "flux":
            mods = _flux_lora(m, format, rank, rank / 2 if alpha is None else float(alpha), targets, seed, size,
                              split_qkv, spelling)
            meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2 if alpha is None else float(alpha)),
                    "ss_base_model_version": "flux1", "prolora.synthetic": "1"}
            path = Path(path)
            write_lora_file(path, LoraFile(format=format, modules=mods, metadata=meta), format)
            return path
        spelling = {"kohya": m.kohya_spelling, "peft": "peft", "diffusers-old": "peft", "comfy": "comfy"}.get(format)
        if spelling is None:
            raise ValueError(f"unknown format {format!r}")
        alpha = rank / 2 if alpha is None else float(alpha)
        scale = alpha / rank
        mods = {}
        for module in lora_targets(m.weights, targets, conv):
            shape = m.weights[module].shape
            g = _generator("lora", seed, module)
            out, rest = shape[0], shape[1:]
            down = torch.randn((rank, *rest), generator=g) / math.sqrt(math.prod(rest))
            up = torch.randn(out, rank, generator=g)
            delta = (up @ down.reshape(rank, -1)).norm() * scale
            up *= size * math.sqrt(out) / delta
            if len(shape) == 4:
                up = up.reshape(out, rank, 1, 1)
            key = m.spell(module, spelling)
            mods[key] = LoraModule(key, down.half(), up.half(), alpha)
        meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), "prolora.synthetic": "1"}
        path = Path(path)
        write_lora_file(path, LoraFile(format=format, modules=mods, metadata=meta), format)
        return path
    finally:
        if opened is not None:
            opened.close()


def flux_lora_targets(modules, targets: str = "transformer") -> Iterator[str]:
    """Canonical Flux transformer ids a LoRA of this kind adapts (see write_lora)."""
    if targets not in ("attn", "transformer", "all"):
        raise ValueError(f"unknown targets {targets!r}; use 'attn', 'transformer' or 'all'")
    for module in modules:
        if not module.startswith("transformer."):
            continue
        in_block = module.startswith(("transformer.transformer_blocks.", "transformer.single_transformer_blocks."))
        if targets == "attn":
            ok = ".attn." in module
        elif targets == "transformer":
            ok = in_block
        else:
            ok = True
        if ok:
            yield module


def _flux_lora(m, format: str, rank: int, alpha: float, targets: str, seed: int, size: float, split_qkv: bool,
               spelling: str | None) -> dict:
    from ..lora import LoraModule

    spelling = spelling or {"kohya": m.kohya_spelling, "peft": "peft", "comfy": "comfy", "xlabs": "xlabs"}.get(format)
    if spelling is None:
        raise ValueError(f"format {format!r} has no Flux layout")
    groups: dict[str, list[tuple[str, tuple[tuple[int, int], ...] | None, int]]] = {}
    for module in flux_lora_targets(m.weights, targets):
        if m.unspellable(module, spelling) is not None:
            continue
        fused = m.spell_fused(module, spelling)
        if fused is None:
            groups.setdefault(m.spell(module, spelling), []).append((module, None, m.weights[module].shape[0]))
        else:
            key, total, rows = fused
            groups.setdefault(key, []).append((module, rows, total))
    mods = {}
    for key, members in groups.items():
        g = _generator("lora", seed, key)
        total = members[0][2]
        inp = m.weights[members[0][0]].shape[1]
        n = len(members) if split_qkv and members[0][1] is not None else 1
        down = torch.randn(n * rank, inp, generator=g) / math.sqrt(inp)
        up = torch.zeros(total, n * rank)
        for j, (module, rows, _) in enumerate(sorted(members, key=lambda x: x[1][0][0] if x[1] else 0)):
            cols = slice(j * rank, (j + 1) * rank) if n > 1 else slice(0, rank)
            for a, b in rows or ((0, total),):
                up[a:b, cols] = torch.randn(b - a, rank, generator=g)
        delta = (up @ down).norm() * (alpha / (n * rank))
        up *= size * math.sqrt(total) / delta
        mods[key] = LoraModule(key, down.half(), up.half(), alpha)
    return mods


# ----------------------------------------------------------------------------- demo


def make_demo(folder: str | os.PathLike) -> dict[str, Path]:
    """A tiny SDXL-shaped source (single-file SGM) and target (diffusers folder, the source plus
    a fine-tune-like perturbation) and a kohya LoRA on all transformer linears of the source."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = write_model(folder / "source_sdxl_tiny.safetensors", "sdxl:tiny", layout="single-file", seed=0)
    target = write_model(folder / "target_sdxl_tiny", "sdxl:tiny", layout="diffusers", seed=0, base=source)
    lora = write_lora(source, folder / "lora_kohya.safetensors", format="kohya", rank=4, targets="transformer")
    return {"source": source, "target": target, "lora": lora}
