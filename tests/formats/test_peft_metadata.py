"""PEFT files' `lora_adapter_metadata`: ranks and alphas per component and per module (patterns
anchored as peft resolves them), as diffusers writes and reads it, and refused where it disagrees with
the tensors."""
from __future__ import annotations

import json
import math

import pytest
from lora_samples import close, dw, lora_file, mod, names_file_and_key, pair, raw
from safetensors import safe_open

from prolora.errors import InvalidLoraError
from prolora.formats import read_lora, write_lora


def test_peft_metadata_rank_disagreeing_with_tensors_is_invalid(tmp_path):
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 8, "unet.target_modules": ["conv_in"]})}
    path = raw(tmp_path / "bad.safetensors", pair("unet.conv_in", "lora_A.weight", "lora_B.weight", r=4), meta)
    with pytest.raises(InvalidLoraError) as e:
        read_lora(path)
    names_file_and_key(e, path, "unet.conv_in")
    assert "lora_adapter_metadata" in str(e.value)


def test_peft_metadata_follows_diffusers_layout(tmp_path):
    mods = [mod("unet.down_blocks.0.attentions.0.proj_in", 8, 8, 4, 4.0),
            mod("unet.down_blocks.0.attentions.0.proj_out", 8, 8, 4, 4.0),
            mod("unet.mid_block.attentions.0.proj_in", 8, 8, 8, 2.0),
            mod("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 8, 8, 2, None)]
    path = tmp_path / "p.safetensors"
    write_lora(path, lora_file("peft", mods))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 4
    assert meta["unet.rank_pattern"] == {"^mid_block.attentions.0.proj_in": 8}
    # alpha 2 on rank 8 is written as alpha 8 with the scale folded into up (ComfyUI reads no metadata)
    assert meta["unet.alpha_pattern"] == {"^mid_block.attentions.0.proj_in": 8}
    assert meta["text_encoder.r"] == 2 and meta["text_encoder.lora_alpha"] == 2  # alpha None -> scale 1
    assert meta["text_encoder.target_modules"] == ["encoder.layers.0.self_attn.q_proj"]
    back = read_lora(path)
    assert [back.modules[m.key].scale for m in mods] == [1.0, 1.0, 1.0, 1.0]
    assert all(close(dw(back.modules[m.key]), dw(m)) for m in mods)


def test_peft_patterns_are_anchored_like_peft_resolves_them(tmp_path):
    """`proj_out` is a suffix of `single_transformer_blocks.0.proj_out` (Flux): patterns must be anchored."""
    from peft.utils.other import get_pattern_key

    mods = [mod("transformer.proj_out", 8, 8, 4, 4.0),
            mod("transformer.single_transformer_blocks.0.proj_out", 8, 8, 8, 2.0),
            mod("transformer.single_transformer_blocks.1.proj_out", 8, 8, 8, 2.0)]
    path = tmp_path / "f.safetensors"
    write_lora(path, lora_file("peft", mods))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    rp, ap = meta["transformer.rank_pattern"], meta["transformer.alpha_pattern"]
    for m in mods:
        name = m.key.removeprefix("transformer.")
        r = rp.get(get_pattern_key(list(rp), name), meta["transformer.r"])
        a = ap.get(get_pattern_key(list(ap), name), meta["transformer.lora_alpha"])
        assert (r, a) == (m.rank, m.rank), name  # scales folded into up: alpha = rank
    back = read_lora(path)
    assert [back.modules[m.key].alpha for m in mods] == [4.0, 8.0, 8.0]
    assert all(close(dw(back.modules[m.key]), dw(m)) for m in mods)


def test_peft_reads_diffusers_written_metadata(tmp_path):
    """Metadata as diffusers' save_lora_weights writes it (per-component LoraConfig, `^` patterns)."""
    cfg = {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"^mid_block.attentions.0.proj_in": 2},
           "unet.alpha_pattern": {"mid_block.attentions.0.proj_in": 1}, "unet.target_modules": ["proj_in", "proj_out"],
           "unet.use_rslora": False, "unet.peft_type": "LORA",
           "text_encoder.r": 4, "text_encoder.lora_alpha": 4, "text_encoder.use_rslora": True,
           "text_encoder.rank_pattern": {}, "text_encoder.alpha_pattern": {}}
    tensors = {**pair("unet.down_blocks.0.attentions.0.proj_in", "lora_A.weight", "lora_B.weight", r=4),
               **pair("unet.mid_block.attentions.0.proj_in", "lora_A.weight", "lora_B.weight", r=2),
               **pair("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "lora_A.weight", "lora_B.weight", r=4)}
    lf = read_lora(raw(tmp_path / "d.safetensors", tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(cfg)}))
    assert lf.modules["unet.down_blocks.0.attentions.0.proj_in"].scale == 2.0
    assert lf.modules["unet.mid_block.attentions.0.proj_in"].scale == 0.5
    assert math.isclose(lf.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].scale, 4 / math.sqrt(4))


def test_peft_model_level_file_uses_unprefixed_metadata(tmp_path):
    """unet.save_lora_adapter() writes keys and LoraConfig without a component prefix."""
    tensors = pair("down_blocks.0.attentions.0.proj_in", "lora_A.weight", "lora_B.weight", r=4)
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 2, "target_modules": ["proj_in"]})}
    lf = read_lora(raw(tmp_path / "m.safetensors", tensors, meta))
    assert lf.modules["down_blocks.0.attentions.0.proj_in"].scale == 0.5
    write_lora(tmp_path / "m2.safetensors", lf)
    back = read_lora(tmp_path / "m2.safetensors").modules["down_blocks.0.attentions.0.proj_in"]
    assert back.scale == 1.0 and close(dw(back), dw(lf.modules["down_blocks.0.attentions.0.proj_in"]))
