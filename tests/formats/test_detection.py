"""Which format a LoRA file is (from its keys), the adapter kinds and keys refused by name, and the
summary `prolora inspect` gives (format, family guess, components, ranks, alphas)."""
from __future__ import annotations

import pytest
import torch
from lora_samples import COMFY_SDXL, KOHYA_SD1, KS, PEFT_SDXL, lora_file, mod, names_file_and_key, pair, raw

from prolora.errors import UnsupportedFormatError
from prolora.formats import detect_format, read_lora, summarize


@pytest.mark.parametrize("keys,fmt", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"], "kohya"),
    (["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
      "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"], "kohya"),
    (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",
      "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight"], "peft"),
    (["transformer.single_transformer_blocks.0.proj_out.lora_A.weight",
      "transformer.single_transformer_blocks.0.proj_out.lora_B.weight",
      "transformer.single_transformer_blocks.0.proj_out.lora_B.bias"], "peft"),
    (["base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight",
      "base_model.model.down_blocks.0.attentions.0.proj_in.lora_B.weight"], "peft"),
    (["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight"], "diffusers-old"),
    (["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight",
      "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight"], "diffusers-old"),
    (["diffusion_model.input_blocks.1.1.proj_in.lora_up.weight",
      "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight"], "comfy"),
    (["text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.lora_up.weight",
      "text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.lora_down.weight"], "comfy"),
    (["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
      "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"], "comfy"),
])
def test_detect_format_from_keys(keys, fmt):
    assert detect_format(keys) == fmt


# DoRA, LoHa, LoKr, LoCon Tucker and full differences are read (tests/formats/test_adapters.py)
@pytest.mark.parametrize("kind,key", [
    ("LoKr Tucker-1", f"{KS}.lokr_t1"),
    ("LyCORIS norm", f"{KS}.w_norm"),
    ("GLoRA", f"{KS}.a1.weight"),
    ("OFT/BOFT", f"{KS}.oft_blocks"),
    ("OFT/BOFT", f"{KS}.oft_diag"),
    ("OFT/BOFT", "base_model.model.down_blocks.0.attentions.0.proj_in.boft_R"),
    ("IA3", "base_model.model.down_blocks.0.attentions.0.proj_in.ia3_l"),
])
def test_refuses_unsupported_adapter_kinds(tmp_path, kind, key):
    path = raw(tmp_path / "x.safetensors", {**pair(KS), key: torch.ones(8, 2)})
    with pytest.raises(UnsupportedFormatError) as e:
        read_lora(path)
    names_file_and_key(e, path, key)
    assert kind in str(e.value)


def test_refuses_unknown_keys_listing_three(tmp_path):
    bad = {f"model.layer{i}.weight": torch.ones(2) for i in range(5)}
    path = raw(tmp_path / "x.safetensors", {**pair(KS), **bad})
    with pytest.raises(UnsupportedFormatError) as e:
        read_lora(path)
    names_file_and_key(e, path, "model.layer0.weight")
    assert "model.layer2.weight" in str(e.value) and "model.layer3.weight" not in str(e.value)
    assert "2 more" in str(e.value)


def test_refuses_mixed_formats(tmp_path):
    path = raw(tmp_path / "x.safetensors", {**pair(KS), **pair("unet.mid_block.attentions.0.proj_in", "lora_A.weight", "lora_B.weight")})
    with pytest.raises(UnsupportedFormatError) as e:
        read_lora(path)
    names_file_and_key(e, path, "unet.mid_block.attentions.0.proj_in.lora_")
    assert "kohya" in str(e.value) and "peft" in str(e.value) and KS in str(e.value)


def test_refuses_file_without_lora_weights(tmp_path):
    path = raw(tmp_path / "x.safetensors", {f"{KS}.alpha": torch.tensor(1.0)})
    with pytest.raises(UnsupportedFormatError) as e:
        read_lora(path)
    names_file_and_key(e, path, f"{KS}.alpha")


def test_bundled_embeddings_are_dropped_with_reason(tmp_path):
    emb = "bundle_emb.mytoken.string_to_param.*"
    path = raw(tmp_path / "x.safetensors", {**pair(KS), f"{KS}.alpha": torch.tensor(1.0), emb: torch.randn(2, 768)})
    lf = read_lora(path)
    assert list(lf.modules) == [KS]
    assert emb in lf.dropped and "embedding" in lf.dropped[emb]


def test_summary_of_sd1_kohya_and_sdxl_peft(tmp_path):
    s = summarize(lora_file("kohya", KOHYA_SD1))
    assert s["format"] == "kohya" and s["family"] == "sd1"  # attn2.to_k input width 768
    assert s["components"] == {"unet": 4, "text_encoder": 1, "text_encoder_2": 0, "other": 0}
    assert s["ranks"] == [4, 8] and s["alphas"] == [1.0, 2.0, 4.0, 8.0] and s["conv_modules"] == 2
    assert s["dtype"] == "float32"
    s = summarize(lora_file("peft", PEFT_SDXL))
    assert s["family"] == "sdxl" and s["components"]["text_encoder_2"] == 1
    s = summarize(lora_file("comfy", COMFY_SDXL[:2], {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}))
    assert s["family"] == "sdxl" and "modelspec.architecture" in s["family_source"]
    flux = summarize(lora_file("kohya", [mod("lora_unet_double_blocks_0_img_attn_qkv", 96, 32, 4)]))
    assert flux["family"] == "flux"
    sgm = summarize(lora_file("kohya", [mod("lora_unet_input_blocks_4_1_proj_in", 8, 8, 2)]))
    assert sgm["family"] == "sdxl"
    assert summarize(lora_file("kohya", [mod(KS, 8, 8, 2)]))["alphas"] == [None]
