"""FLUX.1 -> Chroma, the FLUX.1 kin people migrate LoRAs to (families/flux/).

A tiny diffusers FluxTransformer2DModel (FLUX.1-dev layout: guidance_in, pooled CLIP-L input)
is the source, as a pipeline folder with CLIP-L in text_encoder/ and T5 in text_encoder_2/; a
tiny diffusers ChromaTransformer2DModel of the same widths whose shared weights are the source's
plus a small change is the target, as a diffusers pipeline folder (transformer/, sharded, and its
only encoder, T5, in text_encoder/ as ChromaPipeline has it) and as a BFL single file
(`model.diffusion_model.` keys, the layout diffusers' Chroma single-file converter reads).
Every module of a FLUX.1 LoRA (kohya, PEFT, ComfyUI, split_qkv, ...) lands on a Chroma layer or is
named as dropped (what Chroma lacks: the modulations, time/vector/guidance embedders, CLIP-L),
diffusers' ChromaPipeline loads the output exactly, and a Chroma LoRA goes back onto FLUX.1.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from zoo import bfl_tensors  # noqa: E402

import prolora  # noqa: E402
from prolora.families import open_model  # noqa: E402
from prolora.synthetic import write_lora  # noqa: E402

# the unexpected-keys checks read diffusers' warnings: on here, whatever an earlier module left
pytestmark = pytest.mark.usefixtures("one_thread", "diffusers_warnings")
ADAPTER = "prolora_out"

CHROMA = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
              approximator_num_channels=16, approximator_hidden_dim=40, approximator_layers=5)
# what Chroma lacks, in BFL names (kohya keys flatten them)
CHROMA_LACKS = ("img_mod", "txt_mod", "modulation", "final_layer_adaLN_modulation", "time_in", "vector_in",
                "guidance_in", "lora_te1_")


def _bfl_file(sd: dict[str, torch.Tensor], path: Path, prefix: str = "") -> Path:
    """A diffusers-named Chroma state dict saved as a BFL single file (zoo.bfl_tensors: our layout plan)."""
    from prolora.safetensors_io import save

    save(path, bfl_tensors(sd, prefix))
    return path


@pytest.fixture(scope="module")
def chroma(tmp_path_factory):
    import transformers
    from transformers import CLIPTextConfig
    from zoo import FLUX_TINY as TINY
    from zoo import TE1

    from prolora.formats import read_lora
    from prolora.formats import write_lora as write_lora_file
    from prolora.lora import LoraFile, LoraModule

    d = tmp_path_factory.mktemp("chroma")
    torch.manual_seed(3)
    flux = diffusers.FluxTransformer2DModel(**TINY).eval()
    fsd = {k: v.detach().clone() for k, v in flux.state_dict().items()}
    flux.save_pretrained(d / "flux" / "transformer")
    transformers.CLIPTextModel(CLIPTextConfig(**TE1)).eval().save_pretrained(d / "flux" / "text_encoder")
    t5 = transformers.T5EncoderModel(transformers.T5Config(d_model=24, d_kv=4, num_heads=2, d_ff=32, num_layers=2,
                                                           vocab_size=100)).eval()
    t5.save_pretrained(d / "flux" / "text_encoder_2")
    (d / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    ch = diffusers.ChromaTransformer2DModel(**CHROMA).eval()
    g = torch.Generator().manual_seed(4)
    new = {}
    for k, v in ch.state_dict().items():
        base = fsd.get(k)
        if base is not None and base.shape == v.shape:
            new[k] = base + 0.03 * base.std() * torch.randn(base.shape, generator=g)
        else:
            new[k] = v  # Chroma's own: the approximator
    ch.load_state_dict(new)
    ch.save_pretrained(d / "chroma" / "transformer", max_shard_size="60KB")
    with torch.no_grad():
        for w in t5.parameters():
            w.add_(0.03 * w.std() * torch.randn(w.shape, generator=g))
    t5.save_pretrained(d / "chroma" / "text_encoder")
    (d / "chroma" / "model_index.json").write_text(json.dumps({"_class_name": "ChromaPipeline"}))
    single = _bfl_file({k: v.detach().clone() for k, v in ch.state_dict().items()}, d / "chroma.safetensors",
                       "model.diffusion_model.")
    bare = _bfl_file({k: v.detach().clone() for k, v in ch.state_dict().items()}, d / "chroma_bare.safetensors")
    # Flux LoRAs on every linear of the transformer (kohya BFL names and PEFT), the kohya one with
    # CLIP-L and T5 attention modules too (lora_te1_ / lora_te3_, as kohya's Flux scripts name them)
    kohya = write_lora(d / "flux", d / "flux_kohya.safetensors", format="kohya", rank=4, targets="all")
    lf = read_lora(kohya)
    mods = dict(lf.modules)
    with open_model(d / "flux") as src:
        for module in [m for m in src.weights if m.startswith("text_encoder.") and ".self_attn." in m
                       or m.startswith("text_encoder_2.") and ".SelfAttention." in m]:
            shape = src.weights[module].shape
            key = src.spell(module, "kohya-ldm")
            mods[key] = LoraModule(key, torch.randn(4, shape[1], generator=g).half() * 0.1,
                                   torch.randn(shape[0], 4, generator=g).half() * 0.1, 2.0)
    write_lora_file(kohya, LoraFile(lf.format, mods, dict(lf.metadata)))
    peft = write_lora(d / "flux", d / "flux_peft.safetensors", format="peft", rank=4, targets="all", seed=1)
    return {"dir": d, "source": d / "flux", "target": d / "chroma", "single": single, "bare": bare, "kohya": kohya,
            "peft": peft,
            "state": {k: v.detach().clone() for k, v in ch.state_dict().items()}}


def test_chroma_layout_is_diffusers_single_file_layout():
    """Our BFL layout of a ChromaTransformer2DModel (bfl_file_plan) is what diffusers' own Chroma
    single-file converter reads: the same keys and shapes back, at the real width (3072, meta
    tensors, 2 double and 3 single blocks) since the converter hard-codes it."""
    from diffusers.loaders.single_file_utils import (convert_chroma_transformer_checkpoint_to_diffusers,
                                                     infer_diffusers_model_type)

    from prolora.families.flux.keys import bfl_file_plan

    with torch.device("meta"):
        m = diffusers.ChromaTransformer2DModel(num_layers=2, num_single_layers=3)
    sd = m.state_dict()
    bfl = {}
    for e in bfl_file_plan([(k, tuple(v.shape)) for k, v in sd.items()], "model.diffusion_model."):
        t = torch.cat([sd[n] for n in e.sources])
        bfl[e.key] = torch.cat(t.chunk(2)[::-1]) if e.swap else t
    assert infer_diffusers_model_type(bfl) == "chroma"
    back = convert_chroma_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(back) == set(sd)
    assert all(back[k].shape == sd[k].shape for k in sd)


def test_chroma_is_detected_in_every_layout(chroma):
    from prolora.api import inspect

    for path in (chroma["target"], chroma["target"] / "transformer", chroma["single"], chroma["bare"]):
        with open_model(path) as m:
            assert m.family == "chroma", path
            assert not any(".norm1.linear" in k or "time_text_embed" in k for k in m.weights)
            assert "transformer.distilled_guidance_layer.layers.4.linear_2" in m.weights
        info = inspect(path)
        assert info["kind"] == "model" and info["family"] == "chroma"
        assert info["approximator_layers"] == 5 and info["double_blocks"] == 2 and info["single_blocks"] == 3
        assert "unmapped" not in info
    with open_model(chroma["source"]) as m:
        assert m.family == "flux"


def test_similarity_flux_vs_chroma(chroma):
    res = prolora.similarity(chroma["source"], chroma["single"], cache=False)
    names = {r.module for r in res.report.layers}
    assert "transformer.transformer_blocks.0.attn.to_q" in names
    assert not any("norm1.linear" in n or "distilled" in n for n in names)  # only what both have
    assert min(r.phi_left for r in res.report.layers) > 0.9


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
@pytest.mark.parametrize("layout", ["target", "single"])
def test_flux_lora_onto_chroma_drops_and_names_what_chroma_lacks(chroma, fmt, layout, tmp_path):
    from prolora.formats import read_lora

    out = tmp_path / f"{fmt}.safetensors"
    res = prolora.transfer(chroma["source"], chroma[layout], chroma[fmt], out, tau=0.0, cache=False)
    lora = read_lora(chroma[fmt])
    rows = res.report.layers
    assert {r.source_key for r in rows} == set(lora.modules)  # every module is in the report
    dropped = {r.source_key: r.reason for r in rows if not r.transferred}
    lacks = [k for k in lora.modules if any(x in k for x in CHROMA_LACKS) or "time_text_embed" in k
             or (layout == "single" and k.startswith("lora_te3_"))  # a transformer-only file has no T5
             or ".norm1.linear" in k or "norm1_context.linear" in k or ".norm.linear" in k or "norm_out.linear" in k]
    assert lacks and set(dropped) == set(lacks)
    for key, why in dropped.items():
        assert why.startswith("no counterpart in the target model:") and "has no" in why, (key, why)
    # the output carries no key for a module Chroma lacks, and every key names a Chroma layer
    out_lora = read_lora(out)
    assert out_lora.format == lora.format
    with open_model(chroma[layout]) as t:
        for key in out_lora.modules:
            hit = t.resolve(key) or t.resolve_fused(key)
            assert hit is not None, key
        written = {k for k in out_lora.modules}
    assert not any(any(x in k for x in CHROMA_LACKS) or "time_text_embed" in k or "norm1" in k or "norm_out" in k
                   or k.endswith(".norm.linear") for k in written)
    assert {r.source_key for r in rows if r.transferred} == set(lora.modules) - set(lacks)  # the rest lands


def _chroma_deltas(path: Path) -> dict[str, torch.Tensor]:
    """{diffusers module: dW} of an output, read with client_flux's hand-written BFL table."""
    from client_flux import output_deltas

    ch = diffusers.ChromaTransformer2DModel(**CHROMA)
    return output_deltas(path, {n for n, _ in ch.named_modules()})


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_diffusers_chroma_pipeline_loads_the_output(chroma, fmt, tmp_path, caplog):
    """diffusers' ChromaPipeline (FluxLoraLoaderMixin) loads the output into a ChromaTransformer2DModel:
    every module of the file is attached, no key is unexpected, merged = base + dW from the file.
    Like test_client_flux, the kohya input leaves out what diffusers' Flux converter cannot read at
    tiny widths (single-block linear1) or drops (global modules)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from client_flux import kohya_loadable, without

    lora = chroma[fmt]
    if fmt == "kohya":  # CLIP-L (lora_te1_) modules stay in: the transfer drops them; T5 (lora_te3_) goes,
        import shutil      # this test checks the transformer (diffusers ignores T5 LoRA keys)

        lora = tmp_path / "in_kohya.safetensors"
        shutil.copy(chroma["kohya"], lora)
        lora = without(lora, lambda k: kohya_loadable(k) or k.startswith("lora_te3_"))
    out = tmp_path / f"out_{fmt}.safetensors"
    prolora.transfer(chroma["source"], chroma["target"], lora, out, tau=0.0, cache=False)
    transformer = ChromaTransformer2DModel.from_pretrained(chroma["target"] / "transformer", local_files_only=True)
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                          transformer=transformer)
    before = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    deltas = _chroma_deltas(out)
    assert deltas
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(out), adapter_name=ADAPTER)
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage()]
    adapted = {n: layer for n, layer in transformer.named_modules()
               if hasattr(layer, "lora_A") and ADAPTER in layer.lora_A}
    assert set(adapted) == set(deltas)
    for module, layer in adapted.items():
        layer.merge(adapter_names=[ADAPTER])
        w1 = layer.get_base_layer().weight.detach().double()
        w0 = before[module + ".weight"].double()
        dw = deltas[module]
        # diffusers folds a kohya alpha into fp16 A and B (rounding 2^-11); PEFT files load as stored
        assert float((w1 - (w0 + dw)).norm() / dw.norm()) < (1e-5 if fmt == "peft" else 2e-3), module


def test_flux_to_chroma_from_the_cli(chroma, tmp_path):
    from prolora.cli import main

    out, report = tmp_path / "cli.safetensors", tmp_path / "report.json"
    rc = main(["transfer", str(chroma["source"]), str(chroma["single"]), str(chroma["kohya"]), "-o", str(out),
               "--tau", "0", "--report", str(report), "-q"])
    assert rc == 0 and out.exists()
    text = report.read_text()
    for what in ("img_mod", "txt_mod", "single-block modulation", "final_layer.adaLN_modulation", "time_in",
                 "vector_in", "guidance_in", "CLIP-L"):
        assert what in text, what


def test_pin_diffusers_warns_of_unexpected_keys_for_the_flux_lora_itself(chroma, caplog):
    """The control for the test above: the Flux PEFT LoRA itself, loaded into the Chroma pipeline,
    makes diffusers warn of unexpected keys (the modules Chroma lacks), so the check there can fail."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = ChromaTransformer2DModel.from_pretrained(chroma["target"] / "transformer", local_files_only=True)
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                          transformer=transformer)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(chroma["peft"]), adapter_name=ADAPTER)
    text = " ".join(r.getMessage() for r in caplog.records if "unexpected keys" in r.getMessage())
    assert "norm1.linear" in text and "time_text_embed" in text


def test_chroma_t5_in_text_encoder(chroma, tmp_path):
    """ChromaPipeline keeps T5 in text_encoder/: it is read as T5 (canonical `text_encoder_2.`, so a
    Flux LoRA's T5 modules find it), kohya lora_te3_ modules transfer, and PEFT keys are spelled
    with the pipeline's own component name."""
    with open_model(chroma["target"]) as t:
        assert t.text_encoders == {"text_encoder_2": {"kind": "t5", "layers": 2, "hidden": 24}}
        q = "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"
        assert q in t.weights and t.spell(q, "peft") == "text_encoder.encoder.block.0.layer.0.SelfAttention.q"
        assert t.resolve("text_encoder.encoder.block.0.layer.0.SelfAttention.q")[0] == q
        assert t.resolve("lora_te3_encoder_block_0_layer_0_SelfAttention_q")[0] == q
    res = prolora.transfer(chroma["source"], chroma["target"], chroma["kohya"], tmp_path / "o.safetensors", tau=0.0,
                           cache=False)
    te3 = [r for r in res.report.layers if r.source_key.startswith("lora_te3_")]
    assert te3 and all(r.transferred for r in te3)
    peft = prolora.transfer(chroma["source"], chroma["target"], chroma["kohya"], tmp_path / "p.safetensors",
                            tau=0.0, cache=False, format="peft")
    from prolora.formats import read_lora

    keys = set(read_lora(peft.output).modules)
    assert "text_encoder.encoder.block.0.layer.0.SelfAttention.q" in keys
    assert not any(k.startswith("text_encoder_2.") for k in keys)


@pytest.mark.parametrize("fmt,kw,out_fmt", [("comfy", {}, None), ("kohya", {"split_qkv": True}, None),
                                            ("kohya", {"spelling": "kohya-diffusers"}, None), ("xlabs", {}, "comfy")])
def test_other_flux_lora_formats_onto_chroma(chroma, fmt, kw, out_fmt, tmp_path):
    """ComfyUI-saved, kohya split_qkv and kohya `lora_transformer_` Flux LoRAs keep their format on
    Chroma, dropping what Chroma lacks; an XLabs LoRA (a format with no Chroma loader) is refused
    in one line unless another output format is asked for."""
    from prolora.errors import ModelError
    from prolora.formats import read_lora

    lora = write_lora(chroma["source"], tmp_path / "in.safetensors", format=fmt, rank=4, targets="all", **kw)
    if out_fmt is not None:
        with pytest.raises(ModelError, match="exists for Flux only.*--format"):
            prolora.transfer(chroma["source"], chroma["target"], lora, tmp_path / "refused.safetensors", cache=False)
    opts = {"format": out_fmt} if out_fmt else {}
    res = prolora.transfer(chroma["source"], chroma["target"], lora, tmp_path / "out.safetensors", tau=0.0,
                           cache=False, **opts)
    out = read_lora(res.output)
    assert out.format == (out_fmt or read_lora(lora).format)
    with open_model(chroma["target"]) as t:
        for key in out.modules:
            hit = t.resolve(key) or t.resolve_fused(key)
            assert hit is not None, key
            assert not re.search(r"img_mod|txt_mod|modulation|time_in|vector_in|guidance_in|time_text_embed|norm1|"
                                 r"norm_out|[._]norm[._]linear", key), key
    for r in res.report.layers:
        assert r.transferred or "has no" in r.reason, (r.source_key, r.reason)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_chroma_lora_onto_flux_drops_the_approximator(chroma, fmt, tmp_path):
    """The other way: a LoRA trained on Chroma, with modules on its distilled_guidance_layer, onto
    FLUX.1: those are named as dropped (FLUX.1 has no approximator), the rest transfers."""
    from prolora.formats import read_lora

    lora = write_lora(chroma["single"], tmp_path / "in.safetensors", format=fmt, rank=4, targets="all")
    res = prolora.transfer(chroma["single"], chroma["source"], lora, tmp_path / "out.safetensors", tau=0.0,
                           cache=False)
    keys = set(read_lora(lora).modules)
    dropped = {r.source_key for r in res.report.layers if not r.transferred}
    assert dropped == {k for k in keys if "distilled_guidance_layer" in k} and len(dropped) == 12
    assert all("has no distilled_guidance_layer" in r.reason for r in res.report.layers if not r.transferred)
    assert not any("distilled_guidance_layer" in k for k in read_lora(res.output).modules)
