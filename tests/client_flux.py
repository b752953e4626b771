"""What diffusers itself does with a FLUX.1 LoRA file: the client check of the Flux tests.

`write_models` builds a tiny REAL FluxTransformer2DModel (diffusers, random weights) as the SOURCE,
saved as a BFL single file, and the source plus a fine-tune-like change as the TARGET, saved by
diffusers as a sharded transformer/ folder. `load_and_fuse(target, path)` loads `path` with
diffusers' FluxPipeline.load_lora_weights on a pipeline holding the target transformer and fuses
it: every module diffusers adapted must hold target + dW, with dW computed from the file alone
(its tensors, alphas or lora_adapter_metadata, and the hand-written BFL map `bfl_table`); every
other weight must be untouched. Used by tests/clients/ and tests/families/.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from zoo import FLUX_H as H
from zoo import FLUX_MLP as MLP
from zoo import FLUX_TINY, lora_pairs, peft_value, read_tensors

from prolora.families.flux.keys import bfl_file_plan
from prolora.formats import read_lora, write_lora
from prolora.lora import LoraFile
from prolora.safetensors_io import save

ADAPTER = "prolora_out"
CONFIG = FLUX_TINY
# FLUX.1's block counts at the tiny width: ComfyUI's XLabs reader needs double block 18 and single block 37
DEEP = {**FLUX_TINY, "num_layers": 19, "num_single_layers": 38}


def quiet():
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()


def perturbed(sd: dict[str, torch.Tensor], size: float = 0.07, seed: int = 11) -> dict[str, torch.Tensor]:
    """W + size * ||W|| * unit(low-rank drift (80%) + noise (20%)) per matrix; small jitter elsewhere."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in sd.items():
        if w.dim() == 2:
            m, n = w.shape
            r = max(1, min(m, n) // 16)
            drift = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
            noise = torch.randn(m, n, generator=g)
            d = math.sqrt(0.8) * drift / drift.norm() + math.sqrt(0.2) * noise / noise.norm()
            out[k] = w + size * w.norm() * d / d.norm()
        else:
            out[k] = w + 0.02 * w.abs().mean() * torch.randn(w.shape, generator=g)
    return out


def write_models(tmp_path_factory, config: dict = CONFIG, name: str = "client_flux") -> dict[str, Path]:
    """The tiny FLUX.1 source (a BFL single file) and target (source + a fine-tune-like change, a sharded
    diffusers transformer/ folder): {"dir", "source", "target"}. `config`: CONFIG, or DEEP."""
    import diffusers

    quiet()
    d = tmp_path_factory.mktemp(name)
    torch.manual_seed(5)
    src = diffusers.FluxTransformer2DModel(**config).eval()
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    tensors = {}
    for e in bfl_file_plan([(k, tuple(v.shape)) for k, v in sd.items()]):
        t = torch.cat([sd[n] for n in e.sources])
        if e.swap:
            a, b = t.chunk(2)
            t = torch.cat([b, a])
        tensors[e.key] = t.contiguous()
    save(d / "source.safetensors", tensors)
    tgt = diffusers.FluxTransformer2DModel(**config).eval()
    tgt.load_state_dict(perturbed(sd), strict=True)
    tgt.save_pretrained(d / "target" / "transformer", max_shard_size="60KB")
    (d / "target" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return {"dir": d, "source": d / "source.safetensors", "target": d / "target"}


# ----------------------------------------------------------------------------- LoRAs


def without(path: Path, drop) -> Path:
    lf = read_lora(path)
    keep = {k: m for k, m in lf.modules.items() if not drop(k)}
    write_lora(path, LoraFile(lf.format, keep, dict(lf.metadata)))
    return path


GLOBAL = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")


def kohya_loadable(key: str) -> bool:
    return "linear1" in key or any(g in key for g in GLOBAL)


# ----------------------------------------------------------------------------- our output, read independently


def bfl_table(n_double: int, n_single: int, h: int, mlp: int) -> dict[str, list[tuple[str, list[tuple[int, int]]]]]:
    """BFL / XLabs module -> [(diffusers module, rows of the BFL up taken in order)], from the facts
    in docs/formats.md (written out here, independently of prolora's map)."""
    t: dict[str, list] = {}
    thirds = [[(0, h)], [(h, 2 * h)], [(2 * h, 3 * h)]]
    for i in range(n_double):
        b = f"transformer_blocks.{i}"
        img = [(f"{b}.attn.{n}", r) for n, r in zip(("to_q", "to_k", "to_v"), thirds)]
        txt = [(f"{b}.attn.{n}", r) for n, r in zip(("add_q_proj", "add_k_proj", "add_v_proj"), thirds)]
        t[f"double_blocks.{i}.img_attn.qkv"] = t[f"double_blocks.{i}.processor.qkv_lora1"] = img
        t[f"double_blocks.{i}.txt_attn.qkv"] = t[f"double_blocks.{i}.processor.qkv_lora2"] = txt
        for s, n, out in (("img", 1, "to_out.0"), ("txt", 2, "to_add_out")):
            t[f"double_blocks.{i}.{s}_attn.proj"] = [(f"{b}.attn.{out}", None)]
            t[f"double_blocks.{i}.processor.proj_lora{n}"] = [(f"{b}.attn.{out}", None)]
        for s, ff in (("img", "ff"), ("txt", "ff_context")):
            t[f"double_blocks.{i}.{s}_mlp.0"] = [(f"{b}.{ff}.net.0.proj", None)]
            t[f"double_blocks.{i}.{s}_mlp.2"] = [(f"{b}.{ff}.net.2", None)]
        t[f"double_blocks.{i}.img_mod.lin"] = [(f"{b}.norm1.linear", None)]
        t[f"double_blocks.{i}.txt_mod.lin"] = [(f"{b}.norm1_context.linear", None)]
    for i in range(n_single):
        b = f"single_transformer_blocks.{i}"
        qkv = [(f"{b}.attn.{n}", r) for n, r in zip(("to_q", "to_k", "to_v"), thirds)]
        t[f"single_blocks.{i}.linear1"] = qkv + [(f"{b}.proj_mlp", [(3 * h, 3 * h + mlp)])]
        t[f"single_blocks.{i}.processor.qkv_lora"] = qkv
        t[f"single_blocks.{i}.linear2"] = t[f"single_blocks.{i}.processor.proj_lora"] = [(f"{b}.proj_out", None)]
        t[f"single_blocks.{i}.modulation.lin"] = [(f"{b}.norm.linear", None)]
    t.update({"img_in": [("x_embedder", None)], "txt_in": [("context_embedder", None)],
              "final_layer.linear": [("proj_out", None)],
              # BFL (shift, scale) -> diffusers (scale, shift)
              "final_layer.adaLN_modulation.1": [("norm_out.linear", [(h, 2 * h), (0, h)])]})
    for bfl, emb in (("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance")):
        t[f"{bfl}.in_layer"] = [(f"time_text_embed.{emb}_embedder.linear_1", None)]
        t[f"{bfl}.out_layer"] = [(f"time_text_embed.{emb}_embedder.linear_2", None)]
    return t


def output_deltas(path: Path, module_names: set[str], config: dict = CONFIG) -> dict[str, torch.Tensor]:
    """{diffusers module: dW (float64)} of an output file."""
    tensors, meta = read_tensors(path)
    table = bfl_table(config["num_layers"], config["num_single_layers"], H, MLP)
    flat = {n.replace(".", "_"): n for n in module_names}
    cfg = {k.partition(".")[2]: v for k, v in json.loads(meta.get("lora_adapter_metadata", "{}")).items()}
    out = {}
    for stem, down, up in lora_pairs(tensors):
        if stem.startswith("transformer."):  # peft
            name = stem[len("transformer."):]
            r = peft_value(cfg, "r", "rank_pattern", name)
            assert r == down.shape[0], stem
            out[name] = peft_value(cfg, "lora_alpha", "alpha_pattern", name) / r * (up @ down)
            continue
        alpha = tensors.get(stem + ".alpha")
        dw = (1.0 if alpha is None else float(alpha) / down.shape[0]) * (up @ down)
        if stem.startswith("lora_transformer_"):
            out[flat[stem[len("lora_transformer_"):]]] = dw
            continue
        bfl = stem.removeprefix("diffusion_model.")
        if stem.startswith("lora_unet_"):
            bfl = next(k for k in table if k.replace(".", "_") == stem[len("lora_unet_"):])
        for module, rows in table[bfl]:
            part = dw if rows is None else torch.cat([dw[a:b] for a, b in rows])
            if part.abs().max() > 0:
                out[module] = part
    return out


# ----------------------------------------------------------------------------- the check


def load_and_fuse(target: Path, path: Path, config: dict = CONFIG) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(target / "transformer", local_files_only=True)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    before = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    deltas = output_deltas(path, {n for n, _ in transformer.named_modules()}, config)
    assert deltas, path
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    adapted = {name: layer for name, layer in transformer.named_modules()
               if hasattr(layer, "lora_A") and ADAPTER in layer.lora_A}
    live = {}
    for module, layer in adapted.items():
        a, b = layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach()
        live[module] = layer.scaling[ADAPTER] * (b.double() @ a.double())
        if module not in deltas:  # only a zero-delta module (an XLabs key ComfyUI needs) may be extra
            assert not live[module].any(), module
            continue
        want = deltas[module]
        # diffusers folds a kohya alpha into the fp16 A and B in fp16 (rounding 2^-11 when the
        # scale is no power of two); PEFT files are applied as stored
        tol = 1e-6 if path.name.startswith("peft") else 2e-3
        err = float((live[module] - want).norm() / want.norm())
        assert err < tol, f"{module}: diffusers' delta is {float(live[module].norm() / want.norm()):.4g} times " \
                          f"the file's (rel. err {err:.2g})"
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()
    after = transformer.state_dict()
    assert set(after) == set(before)
    worst, changed = 0.0, set()
    for k, w0 in before.items():
        module = k[: -len(".weight")] if k.endswith(".weight") else None
        if module in adapted:
            dw = live[module]  # = the file's dW, to the tolerance above
            err = float((after[k].double() - (w0.double() + dw)).norm() / dw.norm().clamp_min(1e-30))
            assert err < 1e-5, (module, err)
            worst = max(worst, err)
            changed.add(module)
        else:
            assert torch.equal(after[k], w0), k
    return {"modules": len(deltas), "adapted": set(adapted), "ignored": set(deltas) - set(adapted), "worst": worst}
