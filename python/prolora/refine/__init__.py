"""`--refine`: a short data-free distillation of a LoRA's effect onto the target (issue 18).

After a transfer, the transferred LoRA L' is trained on the target T, starting from the transfer
and keeping its rank, so that T + L' changes T's prediction the way the source LoRA L changes the
source S's: (T+L')(x,t,c) ~ T(x,t,c) + (S+L)(x,t,c) - S(x,t,c) on pure-noise latents x, random
timesteps t and a conditioning c (cond.py). No images, no dataset.

    parts      the family's refine part (prolora.families.<f>.refine): its denoiser and inputs
    denoisers  S and T as diffusers models, from folders or single files
    adapters   LoRA factors hooked into them, switched on and off
    cond       the inputs: latents, timesteps, prompts / tags / random context
    conditioning  which encoders and context, from where; the refusals; the held-out contexts
    textenc    text encoders from pipeline folders, single files that embed them, --text-encoder
    tokens     token ids: a pipeline's tokenizer, CLIP's shipped vocabulary, or random ids
    loop       the loss, Adam, the held-out delta-matching error

`refine_lora` works on open models and LoraFiles (used by `transfer(..., refine=...)`);
`refine` is `prolora refine SOURCE TARGET LORA TRANSFERRED -o OUT`.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import BaseModel
from ..agreement import compare_modules
from ..errors import LoraMismatchError, OptionError
from ..lora import LoraFile, LoraModule
from .adapters import Adapter, place
from .cond import Conditioner, default_resolution, default_tokens, signature
from .conditioning import check_width, pools, resolve
from .denoisers import build_denoiser, denoiser_component, parameter_bytes
from .loop import Pair, RefineOptions, RefineStats, train

PathLike = str | os.PathLike


@dataclass
class RefineResult:
    lora: LoraFile  # the refined LoRA (same format, keys and ranks as the transferred one)
    stats: RefineStats
    output: Path | None


def refine_lora(source: BaseModel, target: BaseModel, lora: LoraFile, transferred: LoraFile, opts: RefineOptions,
                device: str = "cpu", max_device_memory: int | None = None) -> tuple[LoraFile, RefineStats]:
    """Train `transferred`'s denoiser factors on `target` toward `lora`'s effect on `source`.

    Returns the refined LoraFile (the transferred one's format, keys, shapes, alphas and dtype,
    its metadata plus `prolora.refine*` provenance; text-encoder modules unchanged) and the stats;
    when the refined factors do worse on the held-out contexts than the transfer's, the transfer's
    factors are returned unchanged (stats.kept False: loop.improved). Raises LoraMismatchError when `lora` does not
    fit the source or `transferred` the target, OptionError for a conditioning the models cannot
    give (no text encoder and no stated random context among them), or when the two denoisers'
    weights exceed `max_device_memory` on a GPU (`--max-gpu-memory`; activations come on top)."""
    t0 = time.perf_counter()
    comps = denoiser_component(source), denoiser_component(target)
    place_s, _ = place(lora, source, comps[0], "source")
    place_t, _ = place(transferred, target, comps[1], "target")
    if not place_s:
        raise LoraMismatchError(f"{lora.path or 'the LoRA'}: no module on the source's {comps[0]}; nothing to refine")
    if not place_t:
        raise LoraMismatchError(f"{transferred.path or 'the transferred LoRA'}: no module on the target's {comps[1]}; "
                                "nothing to refine")
    plan = resolve(opts, lora, (source, target))  # refusals before any model is built
    s_model, t_model = build_denoiser(source, compute=device), build_denoiser(target, compute=device)
    if device != "cpu" and max_device_memory is not None:
        need = parameter_bytes(s_model) + parameter_bytes(t_model)
        if need > max_device_memory:
            raise OptionError(f"refinement keeps both denoisers on {device}: {need / 2**30:.2f} GiB of weights, more "
                              f"than --max-gpu-memory {max_device_memory / 2**30:.2f} GiB")
    sig_s, sig_t = signature(s_model), signature(t_model)
    check_width(plan, (source, target), sig_t.context_dim)
    tokens = int(opts.tokens or default_tokens(sig_s))
    resolution = int(opts.resolution or default_resolution(s_model))
    t1 = time.perf_counter()
    train_ctx, held_ctx = pools(plan, (source, target), tokens, device, max_device_memory, opts.seed,
                                 opts.holdout)
    t2 = time.perf_counter()
    s_model, t_model = s_model.to(device), t_model.to(device)
    cond = Conditioner(sig_s, sig_t, train_ctx, resolution, tokens, device)
    held = Conditioner(sig_s, sig_t, held_ctx, resolution, tokens, device)
    lora_ad = Adapter(s_model, lora.modules, place_s, device, trainable=False)
    refined = Adapter(t_model, transferred.modules, place_t, device, trainable=True)
    if getattr(t_model, "_supports_gradient_checkpointing", False):
        t_model.enable_gradient_checkpointing()
    probes = {}  # without an encoder the token count is the user's word: show the error at other counts too
    if plan.encoders[0] is None:
        probes = {f"{n} token{'s' * (n > 1)}": Conditioner(sig_s, sig_t, held_ctx, resolution, n, device)
                  for n in sorted({1, default_tokens(sig_s)} - {tokens})}
    stats = train(Pair(s_model, t_model, lora_ad, refined), cond, opts, heldout=held, probes=probes)
    after = refined.factors()
    stats.settings = opts.describe(plan.kind, tokens, resolution)
    stats.conditioning = {"kind": plan.kind, **plan.info}
    stats.timings = {"build": round(t1 - t0, 3), "encode": round(t2 - t1, 3), **stats.timings}
    modules: dict[str, LoraModule] = {}
    for key, m in transferred.modules.items():
        if key in after and stats.kept:
            down, up = after[key]
            m = LoraModule(key, down.to(m.down.dtype), up.to(m.up.dtype), m.alpha, m.bias)
        modules[key] = m
    # each trained module's relative dW change, from the factors (prolora compare's figures)
    changes = compare_modules({k: modules[k] for k in after}, {k: transferred.modules[k] for k in after})
    stats.modules = {x.module: round(x.rel_error, 6) for x in changes.layers if x.rel_error is not None}
    meta = dict(transferred.metadata)
    meta["prolora.refine"] = json.dumps({**stats.settings, "context": plan.info.get("context", ""),
                                         "encoders": plan.info.get("source", "")}, sort_keys=True)
    meta["prolora.refine_error"] = f"{stats.error_before:.6g} -> {stats.error_after:.6g}" + (
        "" if stats.kept else " (no fall beyond the held-out noise: the transfer is kept unrefined)")
    lora_ad.remove()
    refined.remove()
    stats.seconds = round(time.perf_counter() - t0, 3)
    return LoraFile(transferred.format, modules, meta, transferred.dtype), stats


def refine(source: PathLike | BaseModel, target: PathLike | BaseModel, lora: PathLike | LoraFile,
           transferred: PathLike | LoraFile, output: PathLike | None = None, options: RefineOptions | None = None, *,
           device: str = "cpu", max_gpu_memory: int | str | None = None, overwrite: bool = False,
           **option_kwargs) -> RefineResult:
    """Refine an existing transferred LoRA (`prolora refine`); write it to `output` if given
    (atomically: an interrupted run leaves no output)."""
    from ..families import model_of
    from ..outputs import resolve_output
    from ..formats import read_lora, write_lora
    from ..options import parse_size
    from ..plan import check_families

    if options is not None and option_kwargs:
        raise OptionError("pass either options= or option keywords, not both")
    opts = options or RefineOptions(**{"steps": 150, **option_kwargs})
    if opts.steps < 1:
        raise OptionError("refine: steps must be at least 1")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"device {device!r}: no CUDA device is available here")
    out = resolve_output(output, transferred, [source, target, lora, transferred], overwrite) if output else None
    lf = lora if isinstance(lora, LoraFile) else read_lora(lora)
    tf = transferred if isinstance(transferred, LoraFile) else read_lora(transferred)
    from ..formats.adapters import refuse_base_dependent

    refuse_base_dependent(lf, "refine")
    with ExitStack() as stack:
        src = source if isinstance(source, BaseModel) else model_of(source, stack)
        tgt = target if isinstance(target, BaseModel) else model_of(target, stack)
        check_families(src, tgt)
        budget = parse_size(max_gpu_memory) if isinstance(max_gpu_memory, str) else max_gpu_memory
        refined, stats = refine_lora(src, tgt, lf, tf, opts, device, budget)
    if out is not None:
        write_lora(out, refined, refined.format)
        refined.path = out
    return RefineResult(refined, stats, out)


__all__ = ["RefineOptions", "RefineResult", "RefineStats", "refine", "refine_lora"]
