"""The Flux client test: what diffusers itself does with the Flux LoRAs prolora writes.

A tiny REAL FluxTransformer2DModel (diffusers, random weights) is the SOURCE, saved as a BFL
single file; the TARGET is the source plus a fine-tune-like change, saved by diffusers as a
sharded transformer/ folder. LoRAs on the source in every Flux format (kohya BFL names, kohya
split_qkv, kohya `lora_transformer_` names, ComfyUI, XLabs, PEFT) are transferred with
prolora.transfer (prolora-full); the OUTPUT is loaded with diffusers' FluxPipeline.load_lora_weights
on a pipeline holding the target transformer (loaded back from its folder) and fused. For every
module of the output, diffusers' fused weight must equal target + dW, with dW computed here from
the output file alone (its tensors, alphas or lora_adapter_metadata, and this file's own
hand-written BFL map); every other weight must be untouched and no module may be ignored.

What diffusers 0.42 cannot load, and the inputs therefore leave out (pinned at the end): kohya /
ComfyUI LoRAs on single-block linear1 at widths other than FLUX.1's (its converter hard-codes the
3072 / 12288 split), kohya / ComfyUI LoRAs on the global modules (img_in, txt_in, time_in, vector_in,
guidance_in, final_layer: converted without the `transformer.` prefix, then dropped), and
`lora_transformer_` LoRAs outside attention (mapped onto the block itself).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")


import prolora  # noqa: E402
from prolora.families.flux.keys import bfl_file_plan  # noqa: E402
from prolora.formats import read_lora, write_lora  # noqa: E402
from prolora.lora import LoraFile  # noqa: E402
from prolora.safetensors_io import save  # noqa: E402
from prolora.synthetic import write_lora as synth_lora  # noqa: E402
from test_client_diffusers import _peft_value, _read  # noqa: E402
from test_flux import H, MLP, TINY  # noqa: E402
from zoo import lora_pairs  # noqa: E402

ADAPTER = "prolora_out"
CONFIG = TINY


pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet():
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()


# ----------------------------------------------------------------------------- models


def _perturbed(sd: dict[str, torch.Tensor], size: float = 0.07, seed: int = 11) -> dict[str, torch.Tensor]:
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


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    _quiet()
    d = tmp_path_factory.mktemp("client_flux")
    torch.manual_seed(5)
    src = diffusers.FluxTransformer2DModel(**CONFIG).eval()
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    tensors = {}
    for e in bfl_file_plan([(k, tuple(v.shape)) for k, v in sd.items()]):
        t = torch.cat([sd[n] for n in e.sources])
        if e.swap:
            a, b = t.chunk(2)
            t = torch.cat([b, a])
        tensors[e.key] = t.contiguous()
    save(d / "source.safetensors", tensors)
    tgt = diffusers.FluxTransformer2DModel(**CONFIG).eval()
    tgt.load_state_dict(_perturbed(sd), strict=True)
    tgt.save_pretrained(d / "target" / "transformer", max_shard_size="60KB")
    (d / "target" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return {"dir": d, "source": d / "source.safetensors", "target": d / "target"}


# ----------------------------------------------------------------------------- LoRAs


def _without(path: Path, drop) -> Path:
    lf = read_lora(path)
    keep = {k: m for k, m in lf.modules.items() if not drop(k)}
    write_lora(path, LoraFile(lf.format, keep, dict(lf.metadata)))
    return path


_GLOBAL = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")


def _kohya_loadable(key: str) -> bool:
    return "linear1" in key or any(g in key for g in _GLOBAL)


@pytest.fixture(scope="module")
def loras(models):
    d, src = models["dir"], models["source"]
    return {
        "peft": synth_lora(src, d / "peft.safetensors", "peft", rank=4, targets="all", seed=1),
        "kohya": _without(synth_lora(src, d / "kohya.safetensors", "kohya", rank=4, targets="all", seed=2),
                          _kohya_loadable),
        "kohya-split": _without(synth_lora(src, d / "split.safetensors", "kohya", rank=4, split_qkv=True, seed=3),
                                _kohya_loadable),
        "kohya-diffusers": synth_lora(src, d / "ktr.safetensors", "kohya", rank=4, targets="attn",
                                      spelling="kohya-diffusers", seed=4),
        "comfy": _without(synth_lora(src, d / "comfy.safetensors", "comfy", rank=4, targets="all", seed=5),
                          _kohya_loadable),
        "xlabs": synth_lora(src, d / "xlabs.safetensors", "xlabs", rank=4, seed=6),
    }


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


def output_deltas(path: Path, module_names: set[str]) -> dict[str, torch.Tensor]:
    """{diffusers module: dW (float64)} of an output file."""
    tensors, meta = _read(path)
    table = bfl_table(CONFIG["num_layers"], CONFIG["num_single_layers"], H, MLP)
    flat = {n.replace(".", "_"): n for n in module_names}
    cfg = {k.partition(".")[2]: v for k, v in json.loads(meta.get("lora_adapter_metadata", "{}")).items()}
    out = {}
    for stem, down, up in lora_pairs(tensors):
        if stem.startswith("transformer."):  # peft
            name = stem[len("transformer."):]
            r = _peft_value(cfg, "r", "rank_pattern", name)
            assert r == down.shape[0], stem
            out[name] = _peft_value(cfg, "lora_alpha", "alpha_pattern", name) / r * (up @ down)
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


def load_and_fuse(target: Path, path: Path) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(target / "transformer", local_files_only=True)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    before = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    deltas = output_deltas(path, {n for n, _ in transformer.named_modules()})
    assert deltas, path
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    adapted = {name: layer for name, layer in transformer.named_modules()
               if hasattr(layer, "lora_A") and ADAPTER in layer.lora_A}
    assert set(adapted) <= set(deltas), sorted(set(adapted) - set(deltas))[:5]
    live = {}
    for module, layer in adapted.items():
        a, b = layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach()
        live[module] = layer.scaling[ADAPTER] * (b.double() @ a.double())
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
            err = float((after[k].double() - (w0.double() + dw)).norm() / dw.norm())
            assert err < 1e-5, (module, err)
            worst = max(worst, err)
            changed.add(module)
        else:
            assert torch.equal(after[k], w0), k
    return {"modules": len(deltas), "adapted": set(adapted), "ignored": set(deltas) - set(adapted), "worst": worst}


@pytest.mark.parametrize("name", ["peft", "kohya", "kohya-split", "kohya-diffusers", "comfy", "xlabs"])
def test_diffusers_loads_the_transferred_flux_lora(models, loras, name, tmp_path):
    out = tmp_path / f"{name}.safetensors"
    res = prolora.transfer(models["source"], models["target"], loras[name], out, cache=False)
    summary = res.report.summary()
    assert summary["transferred"] == summary["layers"], res.report.table()
    lf = read_lora(out)
    assert lf.format == read_lora(loras[name]).format
    got = load_and_fuse(models["target"], out)
    assert not got["ignored"], sorted(got["ignored"])[:5]
    assert got["modules"] >= {"peft": 50, "kohya": 25, "kohya-split": 25, "kohya-diffusers": 25, "comfy": 25,
                              "xlabs": 15}[name]
    if name in ("kohya", "kohya-split", "comfy", "xlabs"):
        # fused keys come back block-diagonal (kohya split_qkv form): diffusers splits them exactly
        key = {"comfy": "diffusion_model.double_blocks.0.img_attn.qkv", "xlabs": "double_blocks.0.processor.qkv_lora1"}.get(
            name, "lora_unet_double_blocks_0_img_attn_qkv")
        m = lf.modules[key]
        assert m.rank == 12 and m.up[:H, 4:].abs().max() == 0


def test_transferred_linear1_loads_as_peft(models, loras, tmp_path):
    """A kohya LoRA on linear1 (which diffusers cannot load at this width) written as PEFT: the
    q, k, v and proj_mlp slices become separate modules that diffusers loads."""
    src = models["source"]
    kohya = synth_lora(src, tmp_path / "l1.safetensors", "kohya", rank=4, targets="transformer", seed=9)
    out = tmp_path / "l1_peft.safetensors"
    prolora.transfer(src, models["target"], kohya, out, format="peft", cache=False)
    got = load_and_fuse(models["target"], out)
    assert not got["ignored"]
    assert "single_transformer_blocks.2.proj_mlp" in got["adapted"]


# ----------------------------------------------------------------------------- diffusers 0.42, pinned


def test_pin_diffusers_drops_kohya_flux_global_modules(models, tmp_path):
    """kohya LoRAs on img_in / txt_in / time_in / ... convert to keys without `transformer.` and are
    not loaded (a limitation of diffusers, identical for the input and our output). If this starts
    failing, diffusers loads them: add the global modules to the kohya inputs above."""
    src = models["source"]
    path = synth_lora(src, tmp_path / "g.safetensors", "kohya", rank=4, targets="all", seed=7)
    path = _without(path, lambda k: not any(g in k for g in _GLOBAL))
    got = load_and_fuse(models["target"], path)
    assert not got["adapted"] and got["ignored"]
