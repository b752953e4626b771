"""Base models held in memory, as the family readers see them: a diffusers pipeline, one of its
models, or a plain state dict with its model's config, turned into an `InMemory` record.

The family packages (prolora.families.<name>) claim an `InMemory` as they claim a file: its
components' state-dict names and shapes take the place of a safetensors header, so canonical ids,
key maps and the family come out as they do for the same weights on disk, and so does the content
identity (BaseModel.identity) that keys the basis cache. The weights are the modules' own tensors
(detached views: no copy, on whatever device and in whatever dtype they live); a pipeline's
folder is never read.

A PEFT adapter loaded on a module (diffusers' `load_lora_weights`) wraps each adapted layer:
`to_q.weight` becomes `to_q.base_layer.weight` next to `to_q.lora_A.<adapter>.weight`. The base
layer's weight is the base model's weight, so it is read under its plain name and the adapter's
own parameters are left out: loaded adapters are not part of the target.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ModelError
from ..safetensors_io import DTYPE_NAMES, TensorInfo
from .model import BaseModel, TensorSource

LAYOUT = "memory"
# parameters PEFT adds to an adapted layer (the adapter itself, not the base model)
_ADAPTER_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
# tensor key -> (pseudo-file, header entry), as checkpoints.encoders.Tensors
Tensors = dict[str, tuple[Path, TensorInfo]]


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


def _name_of(obj: Any) -> str:
    """The name a report gives the model: its folder's name when it came from one, like the file
    readers, else its class."""
    config = getattr(obj, "config", None)
    path = None
    if isinstance(config, Mapping) or hasattr(config, "get"):
        path = config.get("_name_or_path")
    path = path or getattr(obj, "name_or_path", None)
    return Path(str(path)).name if path else type(obj).__name__


@dataclass
class Held:
    """One component held in memory: its role in the pipeline ("unet", "transformer",
    "transformer_2", "text_encoder", ...; "model" for a module or state dict given alone), its
    class name and config, and its base weights by state-dict name (adapters left out)."""

    role: str
    class_name: str
    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def keys(self) -> list[str]:
        return list(self.tensors)


@dataclass
class InMemory:
    """What a family's `claim_memory` gets: the components of one model held in memory."""

    name: str
    parts: dict[str, Held]  # role -> component
    pipeline: str = ""  # the pipeline's class name; "" for a module or state dict given alone
    pipeline_config: dict = field(default_factory=dict)
    where: Path = field(init=False)
    sources: dict[Path, ModuleTensors] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.where = Path(f"<{self.name} in memory>")

    @property
    def denoiser(self) -> Held | None:
        """The UNet or transformer of a pipeline, or the one component given alone."""
        for role in ("unet", "transformer", "model"):
            if role in self.parts:
                return self.parts[role]
        return None

    def tensors(self, role: str, file_role: str | None = None) -> Tensors:
        """A header-like {name: (pseudo-file, TensorInfo)} of component `role`, registered so the
        model reads the tensors where they live; the pseudo-file is named `file_role` (default:
        the role; a component given alone names the role it would have in a pipeline)."""
        tensors = self.parts[role].tensors
        file = self.where / (file_role or role)
        self.sources[file] = ModuleTensors(tensors)
        return _infos(tensors, file)

    def finish(self, model: BaseModel) -> BaseModel:
        """`model` reading its tensors from the held components."""
        model.resident.update(self.sources)
        return model


def _module_config(module: torch.nn.Module) -> dict:
    config = getattr(module, "config", None)
    return _config_dict(config) if config is not None else {}


def _held(role: str, module: torch.nn.Module) -> Held:
    return Held(role, type(module).__name__, _module_config(module), module_tensors(module))


def is_in_memory(obj: Any) -> bool:
    """What `held` takes: a pipeline, a torch module, or a (state dict, config) pair."""
    if isinstance(obj, torch.nn.Module) or hasattr(obj, "components"):
        return True
    return isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], Mapping)


def held(obj: Any, name: str | None = None) -> InMemory:
    """The InMemory record of a pipeline (its torch modules by role), a model module (role
    "model") or `(state_dict, config)` (role "model", class from the config's `_class_name`)."""
    if hasattr(obj, "components") and not isinstance(obj, torch.nn.Module):
        comps = {k: v for k, v in obj.components.items() if isinstance(v, torch.nn.Module)}
        config = getattr(obj, "config", None)
        return InMemory(name or _name_of(obj), {r: _held(r, m) for r, m in comps.items()}, type(obj).__name__,
                        dict(config) if isinstance(config, Mapping) else {})
    if isinstance(obj, torch.nn.Module):
        return InMemory(name or _name_of(obj), {"model": _held("model", obj)})
    if is_in_memory(obj):
        state, config = obj
        cfg = _config_dict(config)
        label = name or str(cfg.get("_class_name") or "state dict")
        return InMemory(label, {"model": Held("model", str(cfg.get("_class_name", "")), cfg, base_weights(state))})
    raise ModelError(f"a {type(obj).__name__} is no base model: pass a path, a diffusers pipeline, a model "
                     "module or (state_dict, config)")


def text_encoder_kind(h: Held) -> str | None:
    """"clip" or "t5" for a transformers CLIP / T5 text encoder (by config and class), else None."""
    model_type = str(h.config.get("model_type", ""))
    arch = " ".join(h.config.get("architectures") or [])
    if model_type.startswith("clip") or "CLIP" in h.class_name or "CLIP" in arch:
        return "clip"
    if model_type in ("t5", "umt5") or "T5" in h.class_name or "T5" in arch:
        return "t5"
    return None
