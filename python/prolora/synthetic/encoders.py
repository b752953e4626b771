"""Synthetic CLIP text encoders (transformers CLIPTextModel / CLIPTextModelWithProjection): their
configuration, parameter list and config.json. Family-agnostic, like checkpoints/encoders.py: a
family whose models carry CLIP encoders (a UNet's, an all-in-one file's) builds them from here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .params import ParamList, Params


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


def clip_params(te: TextEncoderConfig) -> Params:
    """(transformers name, shape) of a CLIP text encoder, `text_model.`-rooted, state_dict order."""
    h = te.hidden
    p = ParamList()
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


def clip_config_json(te: TextEncoderConfig, dtype: torch.dtype) -> dict:
    """config.json of a CLIP text encoder folder (what transformers' CLIPTextConfig reads)."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if te.projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "hidden_size": te.hidden, "intermediate_size": te.intermediate,
        "num_attention_heads": te.heads, "num_hidden_layers": te.layers, "vocab_size": te.vocab,
        "max_position_embeddings": te.max_positions, "projection_dim": te.projection or te.hidden,
        "hidden_act": te.act, "layer_norm_eps": 1e-5, "torch_dtype": str(dtype).replace("torch.", ""),
    }
