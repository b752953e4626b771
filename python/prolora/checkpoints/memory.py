"""Base models held in memory: a diffusers pipeline, one of its models (UNet2DConditionModel,
FluxTransformer2DModel, ChromaTransformer2DModel, QwenImageTransformer2DModel,
WanTransformer3DModel, a CLIP or T5 text encoder), or a plain state dict with its model's config.

They are read through the same key maps as files (checkpoints.build, checkpoints.flux,
checkpoints.qwen, checkpoints.wan): each module's state-dict names and shapes take the place of a
safetensors header, so the canonical ids, LDM/SGM names, BFL places, original Wan names and the
family come out as they do for the same weights on disk, and so does the content identity (BaseModel.identity) that keys the basis cache. The weights are the
modules' own tensors (detached views: no copy, on whatever device and in whatever dtype they live);
a pipeline's folder is never read. A Wan 2.2 A14B pipeline (transformer and transformer_2) is
read as its folder is, both experts in one model; each expert module by itself is an ordinary Wan
model (what a transfer onto one expert takes: prolora.diffusers.load_lora does one per expert).
Qwen-Image and Wan pipelines are read as their transformers only, as their folders are (their
text encoders, Qwen2.5-VL and UMT5, are no LoRA targets prolora transfers).

A PEFT adapter loaded on a module (diffusers' `load_lora_weights`) wraps each adapted layer:
`to_q.weight` becomes `to_q.base_layer.weight` next to `to_q.lora_A.<adapter>.weight`. The base
layer's weight is the base model's weight, so it is read under its plain name and the adapter's
own parameters are left out: loaded adapters are not part of the target.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ModelError
from ..safetensors_io import DTYPE_NAMES, TensorInfo
from .build import Component, Tensors, assemble, clip_from_transformers, t5_from_transformers, unet_from_diffusers
from .flux import COMPONENT as FLUX_COMPONENT
from .flux import T5, FluxModel, _family, _order, transformer_from_diffusers
from .model import BaseModel, TensorSource
from . import qwen, wan

LAYOUT = "memory"
# parameters PEFT adds to an adapted layer (the adapter itself, not the base model)
_ADAPTER_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
_UNET_CLASSES = ("UNet2DConditionModel",)
_FLUX_CLASSES = ("FluxTransformer2DModel", "ChromaTransformer2DModel")
_QWEN_CLASSES = (qwen.CLASS,)
_WAN_CLASSES = ("WanTransformer3DModel",)


class ModuleTensors(TensorSource):
    """A module's tensors by state-dict name; reads return views of them (no copy)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def close(self) -> None:
        """Nothing to release: the tensors belong to whoever holds the module."""

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.tensors[name][start:stop]

    def runs(self, name: str, runs: list[tuple[int, int]]) -> bytes:
        """Element runs of the flattened tensor, gathered where it lives and copied to the host
        together (a few dozen bytes per weight: the identity's sample, not the weight)."""
        t = self.tensors[name]
        if t.is_contiguous():
            flat = t.reshape(-1)  # a view
            parts = [flat[i:i + n] for i, n in runs]
        else:  # element by element through its multi-index, never a flattened copy
            parts = [t[tuple(int(x) for x in torch.unravel_index(torch.tensor(i + j), t.shape))].reshape(1)
                     for i, n in runs for j in range(n)]
        sample = torch.cat(parts).cpu().contiguous()
        return bytes(sample.view(torch.uint8).numpy())


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of `module` by the names its state dict has without adapters: PEFT
    `base_layer.` names mapped back, adapter parameters left out (see module doc)."""
    merged = []
    for name, sub in module.named_modules():
        if getattr(sub, "merged_adapters", None):
            merged.append(name)
    if merged:
        warnings.warn(f"{type(module).__name__}: {len(merged)} layers have LoRA adapters fused into their "
                      f"weights (e.g. '{merged[0]}'); those weights are the target as they are now",
                      RuntimeWarning, stacklevel=3)
    return base_weights(module.state_dict())  # detached views of the parameters


def base_weights(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict without what PEFT adapters add: `x.base_layer.weight` -> `x.weight`, lora_A /
    lora_B / DoRA magnitude parameters dropped; tensors detached (views, no copy)."""
    out: dict[str, Any] = {}
    for name, t in state.items():
        parts = name.split(".")
        if _ADAPTER_PARTS.intersection(parts):
            continue
        out[".".join(p for p in parts if p != "base_layer")] = t.detach() if isinstance(t, torch.Tensor) else t
    return out


def _infos(tensors: Mapping[str, torch.Tensor], file: Path) -> Tensors:
    """A header-like {name: (pseudo-file, TensorInfo)} for the key maps, from tensors' shapes."""
    out: Tensors = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ModelError(f"{file}: '{name}' is a {type(t).__name__}, not a tensor")
        dtype = DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise ModelError(f"{file}: '{name}' has dtype {t.dtype}, which prolora cannot read (quantized weights?)")
        if t.device.type == "meta":
            raise ModelError(f"{file}: '{name}' is on the meta device (offloaded weights); load the model's "
                             "weights onto a device first")
        nbytes = t.numel() * t.element_size()
        out[name] = (file, TensorInfo(name, dtype, tuple(t.shape), 0, nbytes))
    return out


def _config_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # transformers PretrainedConfig
        return config.to_dict()
    raise ModelError(f"a model config must be a dict or a transformers config, not {type(config).__name__}")


def _kind(config: dict, class_name: str = "", keys=()) -> str:
    """"unet", "flux", "qwen", "wan", "clip" or "t5" from a diffusers / transformers config (and
    class name); Qwen-Image and Wan transformers also from their state-dict names (`keys`), by
    the tests their file readers use (a diffusers config has no name of its class)."""
    name = class_name or str(config.get("_class_name", ""))
    if name in _UNET_CLASSES or "down_block_types" in config:
        return "unet"
    if name in _FLUX_CLASSES or "num_single_layers" in config:
        return "flux"
    if name in _QWEN_CLASSES or qwen.is_qwen_keys(keys) == "":
        return "qwen"
    if name in _WAN_CLASSES or wan.wan_prefix(keys) == ("", False):
        return "wan"
    model_type = str(config.get("model_type", ""))
    arch = " ".join(config.get("architectures") or [])
    if model_type.startswith("clip") or "CLIP" in name or "CLIP" in arch:
        return "clip"
    if model_type in ("t5", "umt5") or "T5" in name or "T5" in arch:
        return "t5"
    raise ModelError(f"{name or 'model'}: not a model prolora reads in memory (UNet2DConditionModel, "
                     "FluxTransformer2DModel, ChromaTransformer2DModel, QwenImageTransformer2DModel, "
                     "WanTransformer3DModel, CLIP or T5 text encoders)")


def _module_config(module: torch.nn.Module) -> dict:
    config = getattr(module, "config", None)
    return _config_dict(config) if config is not None else {}


def _module_kind(module: torch.nn.Module) -> str:
    return _kind(_module_config(module), type(module).__name__, [n for n, _ in module.named_parameters()])


class _Parts:
    """The components of one in-memory model as they are read: tensors by pseudo-file."""

    def __init__(self, where: Path):
        self.where = where
        self.sources: dict[Path, ModuleTensors] = {}

    def tensors(self, role: str, tensors: dict[str, torch.Tensor]) -> Tensors:
        file = self.where / role
        self.sources[file] = ModuleTensors(tensors)
        return _infos(tensors, file)


def _unet_model(parts: _Parts, name: str, unet: dict[str, torch.Tensor],
                encoders: dict[str, dict[str, torch.Tensor]]) -> BaseModel:
    comps: list[Component] = [unet_from_diffusers(parts.tensors("unet", unet), str(parts.where / "unet"))]
    for role, tensors in encoders.items():
        comps.append(clip_from_transformers(parts.tensors(role, tensors), role))
    model = assemble(parts.where, LAYOUT, comps, {}, {}, name=name)
    model.resident.update(parts.sources)
    return model


def _flux_model(parts: _Parts, name: str, transformer: dict[str, torch.Tensor],
                encoders: dict[str, tuple[str, dict[str, torch.Tensor]]]) -> FluxModel:
    """`encoders`: pipeline attribute -> (kind "clip" / "t5", tensors)."""
    weights, bfl, facts = transformer_from_diffusers(parts.tensors(FLUX_COMPONENT, transformer),
                                                     str(parts.where / FLUX_COMPONENT))
    facts_of: dict[str, dict] = {}
    t5_component = T5
    for role, (kind, tensors) in encoders.items():
        if kind == "clip":
            comp = clip_from_transformers(parts.tensors(role, tensors), "text_encoder")
        else:  # FLUX.1 keeps T5 in text_encoder_2, Chroma in text_encoder; canonical ids say text_encoder_2
            comp = t5_from_transformers(parts.tensors(role, tensors), T5)
            t5_component = role
        weights.update(comp.weights)
        facts_of[comp.name] = comp.facts
    model = FluxModel(path=parts.where, name=name, layout=LAYOUT, family=_family(weights), weights=_order(weights),
                      files={}, headers={}, ldm_names={}, text_encoders=facts_of, bfl=bfl, facts=facts,
                      t5_component=t5_component)
    model.resident.update(parts.sources)
    return model


def _qwen_model(parts: _Parts, name: str, transformer: dict[str, torch.Tensor], config: dict,
                pipeline: str = "") -> qwen.QwenModel:
    """A Qwen-Image transformer through the folder reader's key map; `pipeline`: the pipeline's
    class name, which tells the variant as model_index.json does."""
    weights, facts, variant = qwen.transformer_from_diffusers(parts.tensors(qwen.COMPONENT, transformer),
                                                              parts.where / qwen.COMPONENT, config, pipeline)
    model = qwen.QwenModel(path=parts.where, name=name, layout=LAYOUT, family=qwen.FAMILY, weights=weights, files={},
                           headers={}, ldm_names={}, facts=facts, variant=variant)
    model.resident.update(parts.sources)
    return model


def _wan_model(parts: _Parts, name: str, experts: dict[str, dict[str, torch.Tensor]],
               boundary_ratio: float | None = None) -> wan.WanModel:
    """One Wan transformer, or both Wan 2.2 experts by component ("transformer",
    "transformer_2"), through the folder reader's key map."""
    weights, original, facts = wan.transformers_from_diffusers(
        {c: parts.tensors(c, tensors) for c, tensors in experts.items()}, parts.where, boundary_ratio)
    model = wan.WanModel(path=parts.where, name=name, layout=LAYOUT, family=wan._family(facts), weights=weights,
                         files={}, headers={}, ldm_names={}, original=original, facts=facts)
    model.resident.update(parts.sources)
    return model


def _name_of(obj: Any) -> str:
    """The name a report gives the model: its folder's name when it came from one, like the file
    readers, else its class."""
    config = getattr(obj, "config", None)
    path = None
    if isinstance(config, Mapping) or hasattr(config, "get"):
        path = config.get("_name_or_path")
    path = path or getattr(obj, "name_or_path", None)
    return Path(str(path)).name if path else type(obj).__name__


def _from_pipeline(pipe: Any) -> BaseModel:
    comps = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    name = _name_of(pipe)
    parts = _Parts(Path(f"<{name} in memory>"))
    denoiser = comps.get("unet") if "unet" in comps else comps.get("transformer")
    if denoiser is None:
        raise ModelError(f"{type(pipe).__name__}: the pipeline holds no unet or transformer model to adapt")
    kind = _module_kind(denoiser)
    encoders = {role: comps[role] for role in ("text_encoder", "text_encoder_2", "text_encoder_3") if role in comps}
    if kind == "unet":
        for role, enc in encoders.items():
            if _module_kind(enc) != "clip":
                raise ModelError(f"{type(pipe).__name__}: {role} is a {type(enc).__name__}, not a CLIP text encoder")
        return _unet_model(parts, name, module_tensors(denoiser), {r: module_tensors(e) for r, e in encoders.items()})
    if kind == "flux":
        return _flux_model(parts, name, module_tensors(denoiser),
                           {r: (_module_kind(e), module_tensors(e)) for r, e in encoders.items()})
    if kind == "qwen":
        return _qwen_model(parts, name, module_tensors(denoiser), _module_config(denoiser), type(pipe).__name__)
    if kind == "wan":
        experts = {c: comps[c] for c in wan.EXPERTS.values() if c in comps}
        for c, m in experts.items():
            if _module_kind(m) != "wan":
                raise ModelError(f"{type(pipe).__name__}: {c} is a {type(m).__name__}, not a WanTransformer3DModel")
        return _wan_model(parts, name, {c: module_tensors(m) for c, m in experts.items()},
                          getattr(pipe, "config", {}).get("boundary_ratio") if len(experts) == 2 else None)
    raise ModelError(f"{type(pipe).__name__}: its denoiser {type(denoiser).__name__} is no model prolora reads")


def _single(kind: str, tensors: dict[str, torch.Tensor], name: str, config: dict | None = None) -> BaseModel:
    """One model by itself: a UNet, a Flux / Qwen-Image / Wan transformer (`config`: its config,
    whose flags tell a Qwen-Image Layered model) or a text encoder (its canonical component as in
    a pipeline: text_encoder_2 for CLIP with projection and for T5)."""
    parts = _Parts(Path(f"<{name} in memory>"))
    if kind == "unet":
        return _unet_model(parts, name, tensors, {})
    if kind == "flux":
        return _flux_model(parts, name, tensors, {})
    if kind == "qwen":
        return _qwen_model(parts, name, tensors, config or {})
    if kind == "wan":
        return _wan_model(parts, name, {wan.COMPONENT: tensors})
    if kind == "clip":
        role = "text_encoder_2" if "text_projection.weight" in tensors else "text_encoder"
        comp = clip_from_transformers(parts.tensors(role, tensors), role)
    else:
        comp = t5_from_transformers(parts.tensors(T5, tensors), T5)
    model = assemble(parts.where, LAYOUT, [comp], {}, {}, name=name)
    model.resident.update(parts.sources)
    return model


def is_in_memory(obj: Any) -> bool:
    """What `in_memory_model` takes: a pipeline, a torch module, or a (state dict, config) pair."""
    if isinstance(obj, torch.nn.Module) or hasattr(obj, "components"):
        return True
    return isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], Mapping)


def in_memory_model(obj: Any, name: str | None = None) -> BaseModel:
    """A BaseModel over weights held in memory (see module doc).

    `obj`: a diffusers pipeline (its unet or transformer(s) and, for UNet and Flux-family
    pipelines, its text encoders), one model (UNet2DConditionModel, FluxTransformer2DModel,
    ChromaTransformer2DModel, QwenImageTransformer2DModel, WanTransformer3DModel,
    CLIPTextModel[WithProjection], T5EncoderModel), or `(state_dict, config)`: a model's state
    dict under its diffusers / transformers names with that model's config (a dict such as
    `unet.config`, or a transformers config), e.g. weights a training script holds. `name`
    overrides the name reports give it.
    """
    if hasattr(obj, "components") and not isinstance(obj, torch.nn.Module):
        model = _from_pipeline(obj)
    elif isinstance(obj, torch.nn.Module):
        model = _single(_module_kind(obj), module_tensors(obj), name or _name_of(obj), _module_config(obj))
    elif is_in_memory(obj):
        state, config = obj
        cfg = _config_dict(config)
        tensors = base_weights(state)
        model = _single(_kind(cfg, keys=tensors), tensors, name or str(cfg.get("_class_name") or "state dict"),
                        cfg)
    else:
        raise ModelError(f"a {type(obj).__name__} is no base model: pass a path, a diffusers pipeline, a model "
                         "module or (state_dict, config)")
    if name:
        model.name = name
    return model
