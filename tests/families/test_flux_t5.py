"""Flux's T5 text encoder: read from a pipeline's text_encoder_2/ and from ComfyUI's
`text_encoders.t5xxl.transformer.` keys, LoRAs on it (kohya lora_te3_, ComfyUI, PEFT) transferred
like every other layer, and the PEFT output loaded by peft into a transformers T5EncoderModel."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from zoo import FLUX_TINY as TINY  # noqa: E402
from zoo import bfl_tensors  # noqa: E402

import prolora  # noqa: E402
from prolora.families import open_model  # noqa: E402
from prolora.formats import read_lora, write_lora  # noqa: E402
from prolora.lora import LoraFile, LoraModule  # noqa: E402
from prolora.safetensors_io import save  # noqa: E402

T5_MODULES = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
              "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")


def t5(seed: int, perturb: float = 0.0):
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu")
    torch.manual_seed(seed)
    m = transformers.T5EncoderModel(cfg).eval()
    if perturb:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.ndim == 2 and ".block." in name:
                    p.add_(perturb * p.std() * torch.randn_like(p))
    return m


def t5_modules(m) -> list[str]:
    return [n for n, _ in m.named_modules() if n.endswith(T5_MODULES)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Source and target Flux pipelines (same transformer, target T5 = source T5 perturbed), and
    the source as a ComfyUI all-in-one file."""
    d = tmp_path_factory.mktemp("flux_t5")
    torch.manual_seed(0)
    flux = diffusers.FluxTransformer2DModel(**TINY).eval()
    out = {"t5_source": t5(0), "t5_target": t5(0, perturb=0.3)}
    for name, enc in (("source", out["t5_source"]), ("target", out["t5_target"])):
        flux.save_pretrained(d / name / "transformer")
        enc.save_pretrained(d / name / "text_encoder_2")
        (d / name / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
        out[name] = d / name
    sd = bfl_tensors({k: v.detach().clone() for k, v in flux.state_dict().items()}, "model.diffusion_model.")
    sd.update({"text_encoders.t5xxl.transformer." + k: v.detach().clone().contiguous()
               for k, v in out["t5_source"].state_dict().items() if k != "encoder.embed_tokens.weight"})
    save(d / "aio.safetensors", sd)
    out["aio"] = d / "aio.safetensors"
    out["dir"] = d
    return out


def kohya_lora(model, path, rank=4, seed=1):
    """A kohya Flux LoRA on every T5 linear (lora_te3_) and one transformer module."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    names = [m for m in model.weights if m.startswith("text_encoder_2.")] + ["transformer.transformer_blocks.0.attn.to_out.0"]
    for module in names:
        out_f, in_f = model.weights[module].shape
        key = model.spell(module, "kohya-ldm")
        mods[key] = LoraModule(key, torch.randn(rank, in_f, generator=g) * 0.1, torch.randn(out_f, rank, generator=g) * 0.1,
                               float(rank))
    write_lora(path, LoraFile("kohya", mods, {}, torch.float32), "kohya")
    return path


def test_t5_is_read_from_both_layouts(models):
    names = [f"text_encoder_2.{n}" for n in t5_modules(models["t5_source"])]
    assert len(names) == 2 * 7
    for layout in ("source", "aio"):
        m = open_model(models[layout])
        assert set(names) <= set(m.weights), layout
        assert m.weights[names[0]].shape == (32, 32)
        assert m.describe()["components"]["text_encoder_2"]["kind"] == "t5"
        assert m.resolve("lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0") == \
            ("text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wi_0", "kohya-ldm")
        assert m.resolve("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q")[0] == \
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"
    # embeddings and the relative position bias are not LoRA targets
    assert not any("relative_attention_bias" in w or "shared" in w for w in open_model(models["source"]).weights)


def test_t5_lora_transfers_in_every_spelling(models, tmp_path):
    src = open_model(models["source"])
    lora = kohya_lora(src, tmp_path / "k.safetensors")
    # onto the same model, prolora-full gives every dW back
    same = prolora.transfer(models["source"], models["aio"], lora, tmp_path / "same.safetensors", cache=False)
    a, b = read_lora(lora), read_lora(tmp_path / "same.safetensors")
    assert set(a.modules) == set(b.modules) and any(k.startswith("lora_te3_") for k in b.modules)
    for k, m in a.modules.items():
        n = b.modules[k]
        dw_a = m.scale * m.up.double() @ m.down.double()
        dw_b = n.scale * n.up.double() @ n.down.double()
        assert torch.allclose(dw_a, dw_b, rtol=0, atol=1e-5 * dw_a.abs().max()), k
    assert all(r.transferred for r in same.report.layers)
    # onto the perturbed T5: every T5 layer gets a decision, phi below 1, comfy and peft names written
    res = prolora.transfer(models["source"], models["target"], lora, tmp_path / "c.safetensors", format="comfy",
                           tau=0.0, cache=False)
    t5_rows = [r for r in res.report.layers if r.module.startswith("text_encoder_2.")]
    assert len(t5_rows) == 14 and all(r.transferred for r in t5_rows)
    assert min(min(r.phi_left, r.phi_right) for r in t5_rows) < 0.999
    keys = read_lora(tmp_path / "c.safetensors").modules
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q" in keys


def test_peft_output_loads_into_transformers_t5_with_peft(models, tmp_path):
    peft = pytest.importorskip("peft")
    src = open_model(models["source"])
    lora = kohya_lora(src, tmp_path / "k.safetensors", rank=3)
    res = prolora.transfer(models["source"], models["target"], lora, tmp_path / "p.safetensors", format="peft",
                           tau=0.0, cache=False)
    out = read_lora(tmp_path / "p.safetensors")
    t5_mods = {k.removeprefix("text_encoder_2."): m for k, m in out.modules.items() if k.startswith("text_encoder_2.")}
    assert len(t5_mods) == 14 and res.report.summary()["transferred"] == 15
    enc = t5(0, perturb=0.3)  # the target's T5
    base = {k: v.clone() for k, v in enc.state_dict().items()}
    ranks = {m.rank for m in t5_mods.values()}
    cfg = peft.LoraConfig(r=max(ranks), lora_alpha=max(ranks), target_modules=list({n.rsplit(".", 1)[1] for n in t5_mods}),
                          rank_pattern={k: m.rank for k, m in t5_mods.items()},
                          alpha_pattern={k: m.scale * m.rank for k, m in t5_mods.items()})
    model = peft.get_peft_model(enc, cfg)
    state = {}
    for k, m in t5_mods.items():
        state[f"base_model.model.{k}.lora_A.weight"] = m.down
        state[f"base_model.model.{k}.lora_B.weight"] = m.up
    assert not peft.set_peft_model_state_dict(model, state).unexpected_keys
    merged = model.merge_and_unload().state_dict()
    for k, m in t5_mods.items():
        want = base[f"{k}.weight"].double() + m.scale * m.up.double() @ m.down.double()
        assert torch.allclose(merged[f"{k}.weight"].double(), want, atol=1e-5), k
