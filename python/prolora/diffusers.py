"""Inside a diffusers pipeline: load a LoRA trained on another base model, transferred on the fly
onto the pipeline's own models.

    import prolora.diffusers
    report = prolora.diffusers.load_lora(pipe, "style_on_sdxl_base.safetensors",
                                         source="sd_xl_base_1.0.safetensors", adapter_name="style")
    pipe.set_adapters(["style"], [0.8])

The target's weights are the pipeline's modules (checkpoints.memory): read where they live, on
the GPU or the host, in their dtype; its files are never read, and adapters already loaded on the
pipeline are not part of the target. The transferred LoRA goes to the pipeline's own
`load_lora_weights` as a state dict, so multiple LoRAs, `set_adapters`, `fuse_lora` and
`delete_adapters` work as for any LoRA. If anything fails, the pipeline is left with the adapters
it had.

Pipelines: Stable Diffusion 1.5 / SDXL (UNet and CLIP text encoders), Flux and Chroma (transformer
and text encoders), Qwen-Image / Qwen-Image-Edit and Wan (their transformers). A Wan 2.2 A14B
pipeline holds two experts, `transformer` (high noise) and `transformer_2` (low noise): the LoRA
is transferred onto each expert, as `prolora transfer` does onto such a folder (experts.py), and
each result is loaded into its expert under the one adapter name (the low-noise one with
diffusers' `load_into_transformer_2=True`); load_lora then returns {"high_noise": report,
"low_noise": report}.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Mapping

import torch

from .api import transfer
from .checkpoints import BaseModel
from . import families
from .families import in_memory_model
from .families.record import Loader
from .errors import LoraMismatchError, ModelError, OptionError, ProloraError
from .formats import peft
from .formats.detect import FORMAT_MODULES
from .formats.readwrite import lora_from_tensors
from .lora import LoraFile
from .report import Report

PathLike = str | os.PathLike


def _adapters(pipe: Any) -> dict[str, set[str]]:
    """{pipeline component: names of the adapters loaded on it}."""
    return {comp: set(names) for comp, names in pipe.get_list_adapters().items()}


def _all_adapters(pipe: Any) -> set[str]:
    return set().union(*_adapters(pipe).values())


def _adapter_name(pipe: Any, adapter_name: str | None) -> str:
    """The name to load under: the one asked (which must be free) or the first free default_N,
    as diffusers would pick."""
    loaded = _all_adapters(pipe)
    if adapter_name is not None:
        if adapter_name in loaded:
            raise OptionError(f"adapter_name '{adapter_name}' is already loaded on the pipeline; choose another "
                              "name or delete it first (pipe.delete_adapters)")
        return adapter_name
    i = 0
    while f"default_{i}" in loaded:
        i += 1
    return f"default_{i}"


def _lora(lora: PathLike | LoraFile | Mapping[str, torch.Tensor]) -> PathLike | LoraFile:
    """A path or LoraFile as is; a state dict (as a LoRA file would hold it) read as one."""
    if isinstance(lora, Mapping):
        return lora_from_tensors({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                                  for k, v in lora.items()})
    return lora


def diffusers_state_dict(lora: LoraFile, alpha_keys: bool) -> dict[str, torch.Tensor]:
    """The LoRA as a state dict for `load_lora_weights`, in its own format and spelling.

    A state dict has no file metadata, where PEFT keeps its alphas; without them diffusers uses
    alpha = rank. `alpha_keys`: the pipeline's loader reads `<module>.alpha` entries of a PEFT
    state dict as the alphas (diffusers' Flux-family loader does), so they are added; otherwise
    the scale is folded into up (in float32; diffusers casts it to the module's dtype, which can
    round the last bit where loading a file would not)."""
    if lora.format != peft.NAME:
        return FORMAT_MODULES[lora.format].to_tensors(lora, "<transferred LoRA>")
    if alpha_keys:
        out = FORMAT_MODULES[lora.format].to_tensors(lora, "<transferred LoRA>")
        for key, m in lora.modules.items():
            if m.alpha is not None:
                out[f"{key}.alpha"] = torch.tensor(float(m.alpha))
        return out
    folded = {k: replace(m, up=m.up.to(torch.float64).mul(m.scale).to(torch.float32), alpha=None)
              for k, m in lora.modules.items()}
    return FORMAT_MODULES[lora.format].to_tensors(replace(lora, modules=folded), "<transferred LoRA>")


def _components(report: Report, target: BaseModel, expert: str | None = None) -> set[str]:
    """The pipeline components the transferred modules adapt (`expert`: the pipeline component of
    the expert the target is, whose weights are named `transformer.*` as any Wan model's)."""
    out = set()
    for r in report.layers:
        if r.transferred and r.module:
            out.add(expert or target.pipeline_component(r.module.partition(".")[0]))
    return out


def _experts(pipe: Any) -> dict[str, str] | None:
    """{expert label: pipeline component} for a pipeline holding every expert a family's loader
    names (both Wan 2.2 A14B experts), else None."""
    comps = getattr(pipe, "components", {})
    for fam in families.families():
        experts = fam.loader.experts
        if experts and all(isinstance(comps.get(c), torch.nn.Module) for c in experts.values()):
            return dict(experts)
    return None


def _expert_kwargs(comp: str | None) -> dict:
    """load_lora_weights' keyword arguments for an expert component (e.g. load_into_transformer_2)."""
    for fam in families.families():
        if comp in fam.loader.expert_kwargs:
            return dict(fam.loader.expert_kwargs[comp])
    return {}


def _device(target: BaseModel) -> str:
    """Where to compute when not told: where the target's weights live (a pipeline on the GPU
    computes there, without copying its weights anywhere)."""
    for src in target.resident.values():
        for t in src.tensors.values():
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                return "cuda"
    return "cpu"


def load_lora(pipe: Any, lora: PathLike | LoraFile | Mapping[str, torch.Tensor], source: PathLike | BaseModel,
              adapter_name: str | None = None, **options: Any) -> Report | dict[str, Report]:
    """Transfer `lora` (trained on `source`) onto the pipeline's own models and load it there.

    `lora`: a LoRA file, a loaded LoraFile, or a state dict as a LoRA file holds it (any format
    prolora reads). `source`: the base model the LoRA was trained on, a path as on the command
    line (or an opened BaseModel); its bases come from the basis cache when present, and so do
    the target's when the same weights were seen before (on disk or in memory). `adapter_name`:
    the diffusers adapter name (default: the first free `default_N`). `options`: TransferOptions
    fields (method, tau, subspace, device, cache_dir, ...); the device defaults to where the
    pipeline's weights are, and the format handed to diffusers to one it applies exactly from a
    state dict (kohya for UNet pipelines, PEFT with alpha entries for Flux-family ones, PEFT with
    the scale folded into up for Qwen-Image and Wan, whose loaders take no alphas from a state dict).

    Returns the transfer report (`report.info["adapter_name"]` names the adapter); for a Wan 2.2
    pipeline with both experts, {"high_noise": report, "low_noise": report}, one transfer per
    expert (`report.info["expert"]` names it), both loaded under the same adapter name. Raises
    prolora's one-line errors (ProloraError); on any failure the pipeline keeps exactly the
    adapters it had, on every expert.
    """
    if not hasattr(pipe, "load_lora_weights") or not hasattr(pipe, "get_list_adapters"):
        raise ModelError(f"{type(pipe).__name__}: not a diffusers pipeline that loads LoRAs (no load_lora_weights)")
    if "output" in options:
        raise OptionError("load_lora writes no file; use prolora.transfer(..., output=...) for that")
    name = _adapter_name(pipe, adapter_name)
    experts = _experts(pipe)
    lora = _lora(lora)
    # every transfer runs before the pipeline is touched: (expert label, its component, target, result, state)
    loads = []
    for label, comp in (experts or {None: None}).items():
        target = in_memory_model(getattr(pipe, comp) if comp else pipe)
        result, state = _transferred(source, target, lora, dict(options), label)
        loads.append((label, comp, target, result, state))
    before = _adapters(pipe)
    try:
        for label, comp, target, result, state in loads:
            kw = _expert_kwargs(comp)
            pipe.load_lora_weights(state, adapter_name=name, **kw)
            after = _adapters(pipe)
            missed = sorted(c for c in _components(result.report, target, comp) if name not in after.get(c, set()))
            if missed:
                raise LoraMismatchError(f"{type(pipe).__name__}: diffusers loaded no module of the transferred LoRA "
                                        f"into {', '.join(missed)}; nothing loaded")
    except BaseException as e:
        if name in _all_adapters(pipe) - set().union(*before.values()):
            pipe.delete_adapters(name)
        if isinstance(e, ProloraError) or not isinstance(e, Exception):
            raise
        raise LoraMismatchError(f"{type(pipe).__name__}: diffusers could not load the transferred LoRA: "
                                f"{type(e).__name__}: {e}") from None
    for label, _, _, result, _ in loads:
        result.report.info["adapter_name"] = name
        if label:
            result.report.info["expert"] = label
    if experts:
        return {label: result.report for label, _, _, result, _ in loads}
    return loads[0][3].report


def _transferred(source: PathLike | BaseModel, target: BaseModel, lora: PathLike | LoraFile, options: dict,
                 expert: str | None) -> tuple[Any, dict[str, torch.Tensor]]:
    """The transfer onto `target` and its output as the state dict the pipeline's loader takes;
    a LoRA of which nothing transferred is refused (`expert`: named in the message)."""
    options.setdefault("device", _device(target))
    # the format diffusers applies exactly from a state dict, as the family's record says: kohya
    # (alphas as tensors) for UNet pipelines; PEFT with alpha entries for Flux-family ones (diffusers
    # folds kohya Flux alphas into fp16 factors); PEFT, scale folded, for the others
    loader = fam.loader if (fam := families.of(target)) is not None else Loader()
    options.setdefault("format", loader.format)
    result = transfer(source, target, lora, **options)
    if result.lora is None or not result.lora.modules:
        why = ", ".join(f"{n} {reason}" for reason, n in result.report.summary()["skipped_by_reason"].items())
        onto = f"the {expert.replace('_', '-')} expert of {target.name}" if expert else target.name
        raise LoraMismatchError(f"no layer of the LoRA was transferred onto {onto} (skipped: {why or 'none'}); "
                                "nothing loaded")
    return result, diffusers_state_dict(result.lora, alpha_keys=loader.alpha_keys)
