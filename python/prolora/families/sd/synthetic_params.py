"""The (name, shape) of every UNet2DConditionModel parameter of a synthetic SD model, in state_dict
order, without importing diffusers (tests/families/test_synthetic.py checks the lists against the class).
"""
from __future__ import annotations

from ...synthetic.params import ParamList, Params

# UNet2DConditionModel's defaults for every key that shapes a parameter (a preset's `unet` dict
# overrides them; unet_params reads the merged dict, and config.json holds it)
UNET_DEFAULTS = dict(
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


class UnetParams(ParamList):
    """A parameter list with the blocks a UNet2DConditionModel is made of (resnets, transformers)."""

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
    unknown = set(cfg) - set(UNET_DEFAULTS) - _SHAPELESS
    if unknown:
        raise ValueError(f"unet config keys not supported by the synthetic generator: {sorted(unknown)}")
    c = {**UNET_DEFAULTS, **cfg}
    chans, L, n = list(c["block_out_channels"]), c["layers_per_block"], len(c["block_out_channels"])
    if not isinstance(L, int):
        raise ValueError("layers_per_block must be one int")
    heads = _per_level(c["num_attention_heads"] or c["attention_head_dim"], n)
    depth = _per_level(c["transformer_layers_per_block"], n)
    rdepth = c["reverse_transformer_layers_per_block"] or list(reversed(depth))
    cross, lin = c["cross_attention_dim"], c["use_linear_projection"]
    T = c["time_embedding_dim"] or chans[0] * 4
    p = UnetParams()
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
    mid = UnetParams()
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
