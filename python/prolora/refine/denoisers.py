"""The denoisers S and T as diffusers models, built from the base models prolora reads.

- diffusers folders (a pipeline with unet/ or transformer/, or a bare component folder): the
  model class's own `from_pretrained` on the component folder, local files only, in the stored
  dtype (the fp16 variant when that is what the folder holds);
- single files (LDM/SGM SD checkpoints, BFL Flux files): the diffusers model is built from a config
  read off the weights' shapes (`unet_config` / `flux_config`), then its state dict is filled from
  the file through the project's own key maps (`single_file_plan` for UNets, `bfl_file_plan` for
  Flux: the plans that write such files, read backwards), so no key map is written twice.

The models come back in eval mode with every parameter frozen: only the LoRA factors train.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..checkpoints import BaseModel
from ..checkpoints.flux import COMPONENT as FLUX_COMPONENT, FluxModel, bfl_file_plan, is_flux_keys
from ..families.sd.read import UNET_PREFIX, single_file_plan
from ..errors import ModelError
from ..checkpoints.folders import weight_files

_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def model_dtype(base: BaseModel, component: str) -> torch.dtype:
    """The stored floating dtype of the denoiser's weights (the most common one)."""
    counts: dict[str, int] = {}
    for ref in base.weights.values():
        if ref.module.startswith(component + "."):
            counts[ref.dtype] = counts.get(ref.dtype, 0) + ref.numel
    if not counts:
        raise ModelError(f"{base.path}: no {component} weights")
    return _DTYPES.get(max(counts, key=counts.get), torch.float32)


def denoiser_component(base: BaseModel) -> str:
    """'unet' or 'transformer': which component of `base` the refinement trains against. Families
    without a denoiser builder here (e.g. Qwen-Image, Wan) are refused by name."""
    if isinstance(base, FluxModel) and base.family in ("flux", "chroma"):
        return FLUX_COMPONENT
    if not isinstance(base, FluxModel) and any(m.startswith("unet.") for m in base.weights):
        return "unet"
    raise ModelError(f"{base.path}: refinement supports SD-family UNets and Flux/Chroma transformers; "
                     f"this is a {base.family} model")


def build_denoiser(base: BaseModel, device: str = "cpu") -> torch.nn.Module:
    """The diffusers denoiser of `base` (UNet2DConditionModel, FluxTransformer2DModel or
    ChromaTransformer2DModel), on `device`, in the stored dtype, eval mode, parameters frozen."""
    component = denoiser_component(base)
    dtype = model_dtype(base, component)
    if base.layout == "diffusers":
        model = _from_folder(Path(base.path), component, dtype)
    elif component == "unet":
        model = _unet_from_single_file(base, dtype)
    else:
        model = _flux_from_single_file(base, dtype)
    model.requires_grad_(False)
    return model.to(device).eval()


def _component_folder(path: Path, component: str) -> Path:
    return path / component if (path / component).is_dir() else path


def _from_folder(path: Path, component: str, dtype: torch.dtype) -> torch.nn.Module:
    folder = _component_folder(path, component)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise ModelError(f"{folder}: config.json is missing or not JSON") from None
    cls = _model_class(config.get("_class_name") or ("UNet2DConditionModel" if component == "unet" else ""), folder)
    variant = _variant(folder)
    try:
        return cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, variant=variant,
                                   use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{folder}: diffusers could not build {cls.__name__} from it: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _variant(folder: Path) -> str | None:
    """The diffusers variant ("fp16", ...) of the weights prolora's reader picks in `folder`."""
    m = re.search(r"\.(\w+)\.safetensors$", weight_files(folder)[0].name)
    return m.group(1) if m else None


_CLASSES = ("UNet2DConditionModel", "FluxTransformer2DModel", "ChromaTransformer2DModel")


def _model_class(name: str, where: Path):
    if name not in _CLASSES:
        raise ModelError(f"{where}: refinement needs a denoiser of class {', '.join(_CLASSES)}; config names {name!r}")
    import diffusers

    return getattr(diffusers, name)


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
    attention heads) follows the family: 8 heads for SD1.x, 64-wide heads otherwise (SD2.x, SDXL),
    as in the published configs."""
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
        attention_head_dim=8 if sd1 else [max(1, c // 64) for c in chans],
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


def _unet_from_single_file(base: BaseModel, dtype: torch.dtype) -> torch.nn.Module:
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
    return _filled(model, state, path)


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


def _flux_from_single_file(base: FluxModel, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    if base.family != "flux":
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
    return _filled(model, state, path)


def _filled(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ModelError(f"{path}: no tensor for the model's '{missing[0]}' ({len(missing)} missing)")
    bad = next((n for n, p in model.state_dict().items() if tuple(state[n].shape) != tuple(p.shape)), None)
    if bad is not None:
        raise ModelError(f"{path}: '{bad}' has shape {tuple(state[bad].shape)}, the model expects "
                         f"{tuple(model.state_dict()[bad].shape)}")
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, assign=True)
    return model


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers take."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


__all__ = ["build_denoiser", "denoiser_component", "flux_config", "model_dtype", "parameter_bytes", "unet_config"]
