"""Architectures prolora recognises but does not transfer, refused by name.

Strict detection means no family reads a model it does not know; this package makes the refusal
say what the model is instead of "unknown". It claims an input when a marker of a known
architecture is present (a key only that architecture has, from diffusers' own single-file
detection table, or the diffusers class in config.json / of a module in memory) and raises
ModelError naming it. A family that gains support for one of these moves it out of the table
below into its own package (`registry.PACKAGES` asks families in order, this package last).
"""
from __future__ import annotations

from pathlib import Path

from ...checkpoints.folders import class_name
from ...errors import ModelError
from ..record import Family

# (title, diffusers class names, single-file marker keys without ComfyUI's `model.diffusion_model.`)
KNOWN: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("a FLUX.3 transformer", ("Flux3Transformer2DModel",), ("early_stream_modulations.image.lin.weight",)),
    ("a Qwen-Image 2.1 transformer", ("QwenImage21Transformer2DModel",), ("txt_in.text_norm.weight",)),
    ("a Krea 2 transformer", ("Krea2Transformer2DModel",), ("txtfusion.projector.weight",)),
    ("a Stable Diffusion 3 / 3.5 transformer (MMDiT)", ("SD3Transformer2DModel",),
     ("joint_blocks.0.context_block.adaLN_modulation.1.bias",)),
    ("a HiDream-I1 transformer", ("HiDreamImageTransformer2DModel",),
     ("double_stream_blocks.0.block.adaLN_modulation.1.bias",)),
    ("a Lumina 2 transformer", ("Lumina2Transformer2DModel",), ("cap_embedder.0.weight",)),
    ("an LTX-2 transformer", ("LTX2VideoTransformer3DModel",),
     ("av_ca_a2v_gate_adaln_single.emb.timestep_embedder.linear_1.weight",)),
    ("an LTX-Video transformer", ("LTXVideoTransformer3DModel",), ("patchify_proj.weight",)),
    ("a HunyuanVideo transformer", ("HunyuanVideoTransformer3DModel", "HunyuanVideo15Transformer3DModel",
                                    "HunyuanVideoFramepackTransformer3DModel"),
     ("txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias",)),
    ("a Wan VACE transformer", ("WanVACETransformer3DModel",), ("vace_blocks.0.after_proj.bias",)),
    ("a Wan Animate transformer", ("WanAnimateTransformer3DModel", "WanAnimate2Transformer3DModel"),
     ("motion_encoder.dec.direction.weight",)),
    ("an AuraFlow transformer", ("AuraFlowTransformer2DModel",), ("double_layers.0.attn.w2q.weight",)),
    ("a Mochi transformer", ("MochiTransformer3DModel",), ("blocks.0.attn.qkv_x.weight",)),
    ("a Sana transformer", ("SanaTransformer2DModel",), ("blocks.0.cross_attn.kv_linear.weight",)),
    ("a Stable Cascade model", (), ("clip_txt_mapper.weight", "down_blocks.1.0.channelwise.0.weight")),
)
_PREFIXES = ("model.diffusion_model.", "")


def _refuse(where: object, title: str, cls: str = "") -> ModelError:
    what = f"{title} ({cls})" if cls else title
    return ModelError(f"{where}: {what}: not supported (prolora transfers between models of one family it "
                      "reads; see `prolora inspect` and docs/formats.md for the families)")


def claim_file(path: Path, header) -> None:
    """Refuse a single file that holds a known unsupported architecture; None otherwise."""
    keys = header.tensors
    for title, classes, markers in KNOWN:
        if any(p + m in keys for p in _PREFIXES for m in markers):
            raise _refuse(path, title, classes[0] if classes else "")
    return None


def claim_folder(path: Path) -> None:
    """Refuse a diffusers folder (pipeline or bare component) of a known unsupported class."""
    for cfg in (path / "config.json", path / "transformer" / "config.json", path / "prior" / "config.json"):
        name = class_name(cfg)
        for title, classes, _ in KNOWN:
            if name in classes:
                raise _refuse(path, title, name)
    return None


def claim_memory(item) -> None:
    """Refuse a pipeline or module whose denoiser is of a known unsupported class."""
    d = item.denoiser
    if d is not None:
        for title, classes, _ in KNOWN:
            if d.class_name in classes:
                raise _refuse(item.name, title, d.class_name)
    return None


FAMILY = Family(
    name="unsupported", members=(), title="architectures recognised and refused by name",
    claim_file=claim_file, claim_folder=claim_folder, claim_memory=claim_memory, refuses=True,
    metadata_hints=(("sd3", "sd3"), ("stable-diffusion-v3", "sd3"), ("stable-diffusion-3", "sd3")),
)
