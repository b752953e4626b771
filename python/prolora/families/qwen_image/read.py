"""Qwen-Image on disk: single files (the transformer's diffusers names, bare or under
`model.diffusion_model.`) and diffusers folders (a pipeline with transformer/, or the bare
transformer folder), as claim_file / claim_folder; and the transformer from diffusers names,
which the in-memory reader shares. A Qwen-Image-2.1 transformer is refused by name."""
from __future__ import annotations

from pathlib import Path

from ...checkpoints.folders import class_name, config_of, read_component
from ...checkpoints.model import WeightRef
from ...errors import ModelError
from ...safetensors_io import Header, TensorInfo, read_header
from .keys import BLOCK, BLOCK_LINEARS, CLASS, COMPONENT, MEMBER, PIPELINES, PREFIXES, TOP, V21_KEYS, V21_REFUSAL
from .model import QwenModel


def claim_file(path: Path, header: Header) -> QwenModel | None:
    """The model of a single file whose keys hold a Qwen-Image transformer, else None (raises for
    a Qwen-Image-2.1 one)."""
    return open_qwen_single_file(path, header) if is_qwen_keys(header.tensors) is not None else None


def claim_folder(path: Path) -> QwenModel | None:
    """The model of a diffusers folder whose config names QwenImageTransformer2DModel exactly,
    else None (a folder with unet/ is an SD pipeline's)."""
    return open_qwen_folder(path) if not (path / "unet").is_dir() and is_qwen_folder(path) else None


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
        if any(prefix + k in keys for k in V21_KEYS):
            raise ModelError(V21_REFUSAL)
    return None


def _order(weights: dict[str, WeightRef]) -> dict[str, WeightRef]:
    """Model order: embedders, blocks by index (their linears in BLOCK_LINEARS order), output layers."""
    role = {r: i for i, r in enumerate(BLOCK_LINEARS)}

    def rank(module: str):
        path = module.partition(".")[2]
        m = BLOCK.match(path)
        if m:
            return (1, int(m.group(1)), role.get(m.group(2), len(role)), path)
        return (2 if path in ("norm_out.linear", "proj_out") else 0, 0, 0, path)
    return dict(sorted(weights.items(), key=lambda kv: rank(kv[0])))


def _facts(weights: dict[str, WeightRef]) -> dict:
    """Block count and widths, read from the shapes (so tiny test models report their own)."""
    shapes = {m.partition(".")[2]: r.shape for m, r in weights.items()}
    blocks = {int(m.group(1)) for m in map(BLOCK.match, shapes) if m}
    q = shapes.get("transformer_blocks.0.attn.to_q")
    mlp = shapes.get("transformer_blocks.0.img_mlp.net.0.proj")
    txt = shapes.get("txt_in")
    img = shapes.get("img_in")
    return {"transformer_blocks": len(blocks), "hidden": q[0] if q else None, "mlp_hidden": mlp[0] if mlp else None,
            "joint_attention_dim": txt[1] if txt else None, "in_channels": img[1] if img else None}



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
    return QwenModel(path=path, name=path.stem, layout="single-file", family=MEMBER, weights=weights,
                     files={"single-file": path}, headers={path: header}, facts=facts)


def is_qwen_folder(path: Path) -> bool:
    """A diffusers Qwen-Image pipeline folder (transformer/ holds a QwenImageTransformer2DModel) or
    a bare transformer folder."""
    return CLASS in (class_name(path / "transformer" / "config.json"), class_name(path / "config.json"))


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
    files: dict[str, Path] = {}
    headers: dict[Path, Header] = {}
    folder = path / COMPONENT if (path / COMPONENT).is_dir() else path
    config = config_of(folder)
    pipeline = class_name(path / "model_index.json") if folder != path else ""
    weights, facts, variant = transformer_from_diffusers(read_component(folder, path, files, headers), folder,
                                                         config, pipeline)
    if folder != path and (path / "text_encoder").is_dir():
        facts["text_encoder"] = "Qwen2.5-VL, not read (not a LoRA target of the Qwen-Image trainers)"
    return QwenModel(path=path, name=path.name, layout="diffusers", family=MEMBER, weights=weights, files=files,
                     headers=headers, facts=facts, variant=variant)
