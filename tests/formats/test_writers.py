"""Tests of prolora.formats: detection, validation, round trips, scale semantics, and what
diffusers (the real client) makes of the files we write."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from prolora.errors import InvalidLoraError, OptionError, OutputPathError, UnsupportedFormatError
from prolora.formats import detect_format, read_lora, summarize, write_lora
from prolora.lora import LoraFile, LoraModule

GEN = torch.Generator().manual_seed(1234)


def mod(key: str, out: int, inn: int, r: int, alpha: float | None = None, conv: tuple[int, int] | None = None,
        dtype: torch.dtype = torch.float32, bias: bool = False) -> LoraModule:
    if conv is None:
        down, up = torch.randn(r, inn, generator=GEN), torch.randn(out, r, generator=GEN)
    else:
        down, up = torch.randn(r, inn, *conv, generator=GEN), torch.randn(out, r, 1, 1, generator=GEN)
    b = torch.randn(out, generator=GEN).to(dtype) if bias else None
    return LoraModule(key, down.to(dtype), up.to(dtype), alpha, b)


def lora_file(fmt: str, modules: list[LoraModule], metadata: dict[str, str] | None = None,
              dtype: torch.dtype = torch.float32) -> LoraFile:
    return LoraFile(fmt, {m.key: m for m in modules}, dict(metadata or {}), dtype)


def raw(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write an input file with the safetensors library itself (as other tools do)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def dw(m: LoraModule) -> torch.Tensor:
    return m.scale * (m.up.double().flatten(1) @ m.down.double().flatten(1))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    """Relative Frobenius error below tol (float32 rounding of a folded scale is ~1e-7)."""
    return float((a.double() - b.double()).norm()) <= tol * float(b.double().norm())


def names_file_and_key(exc: pytest.ExceptionInfo, path: Path, key: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg, msg
    assert key in msg, msg


# A few real module names per format (SD1.5 diffusers names; SDXL names where noted).
KOHYA_SD1 = [
    mod("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 640, 640, 8, 4.0),
    mod("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 640, 768, 8, 4.0),
    mod("lora_unet_down_blocks_1_attentions_0_proj_in", 640, 640, 4, 2.0, conv=(1, 1)),
    mod("lora_unet_down_blocks_1_resnets_0_conv1", 640, 320, 4, 1.0, conv=(3, 3)),
    mod("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, 8, 8.0),
]
PEFT_SDXL = [
    mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640, 640, 8, 4.0),
    mod("unet.down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k", 1280, 2048, 16, 8.0),
    mod("unet.down_blocks.1.resnets.0.conv1", 640, 320, 4, 4.0, conv=(3, 3)),
    mod("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 768, 768, 8, 4.0),
    mod("text_encoder_2.text_model.encoder.layers.3.mlp.fc1", 5120, 1280, 8, 2.0),
]
OLD_SD1 = [
    mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640, 640, 8),
    mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", 640, 640, 8),
    mod("text_encoder.text_model.encoder.layers.0.self_attn.k_proj", 768, 768, 4),
]
COMFY_SDXL = [
    mod("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q", 640, 640, 8),
    mod("diffusion_model.input_blocks.4.0.in_layers.2", 640, 320, 4, conv=(3, 3)),
    mod("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", 768, 768, 8),
    mod("text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc2", 1280, 5120, 8),
]
EXAMPLES = {"kohya": KOHYA_SD1, "peft": PEFT_SDXL, "diffusers-old": OLD_SD1, "comfy": COMFY_SDXL}


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", list(EXAMPLES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_keeps_tensors_keys_alphas_metadata(tmp_path, fmt, dtype):
    modules = [LoraModule(m.key, m.down.to(dtype), m.up.to(dtype), m.alpha) for m in EXAMPLES[fmt]]
    meta = {"ss_network_module": "networks.lora", "modelspec.title": "test", "mine": "kept"}
    src = lora_file(fmt, modules, meta, dtype)
    path = tmp_path / f"{fmt}.safetensors"
    write_lora(path, src)
    back = read_lora(path)
    assert back.format == fmt
    assert list(back.modules) == list(src.modules)
    assert back.dtype == dtype
    for key, m in src.modules.items():
        b = back.modules[key]
        assert b.down.dtype == dtype and b.up.dtype == dtype
        assert torch.equal(b.down, m.down) and torch.equal(b.up, m.up)
        assert b.alpha == m.alpha
    for k, v in meta.items():
        assert back.metadata[k] == v
    assert back.path == path and back.dropped == {}


def test_peft_round_trip_with_bias_and_without_alphas(tmp_path):
    m1 = mod("unet.mid_block.attentions.0.proj_out", 1280, 1280, 4, bias=True)
    m2 = mod("unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2", 1280, 5120, 4)
    path = tmp_path / "p.safetensors"
    write_lora(path, lora_file("peft", [m1, m2]))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert "unet.mid_block.attentions.0.proj_out.lora_B.bias" in f.keys()
    assert meta["format"] == "pt"
    assert "lora_adapter_metadata" not in meta  # no alpha anywhere: diffusers' default scale 1 is right
    back = read_lora(path)
    assert torch.equal(back.modules[m1.key].bias, m1.bias)
    assert back.modules[m1.key].alpha is None and back.modules[m2.key].alpha is None


def test_kohya_writes_alpha_rank_for_modules_without_alpha(tmp_path):
    m = mod("lora_unet_mid_block_attentions_0_proj_out", 1280, 1280, 16)
    path = tmp_path / "k.safetensors"
    write_lora(path, lora_file("kohya", [m]))
    with safe_open(str(path), "pt") as f:
        alpha = f.get_tensor(f"{m.key}.alpha")
    assert alpha.shape == () and alpha.dtype == torch.float32 and alpha.item() == 16.0
    back = read_lora(path).modules[m.key]
    assert back.alpha == 16.0 and back.scale == 1.0


# ----------------------------------------------------------------------------- detection


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


def _pair(stem: str, down: str = "lora_down.weight", up: str = "lora_up.weight", r: int = 2) -> dict:
    return {f"{stem}.{down}": torch.randn(r, 8), f"{stem}.{up}": torch.randn(8, r)}


KS = "lora_unet_down_blocks_0_attentions_0_proj_in"


@pytest.mark.parametrize("kind,key", [
    ("DoRA", f"{KS}.dora_scale"),
    ("DoRA", "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector"),
    ("LoHa", f"{KS}.hada_w1_a"),
    ("LoKr", f"{KS}.lokr_w1"),
    ("LoCon-Tucker", f"{KS}.lora_mid.weight"),
    ("GLoRA", f"{KS}.a1.weight"),
    ("OFT/BOFT", f"{KS}.oft_blocks"),
    ("OFT/BOFT", f"{KS}.oft_diag"),
    ("OFT/BOFT", "base_model.model.down_blocks.0.attentions.0.proj_in.boft_R"),
    ("IA3", "base_model.model.down_blocks.0.attentions.0.proj_in.ia3_l"),
    ("full-difference", f"{KS}.diff"),
    ("full-difference", f"{KS}.diff_b"),
])
def test_refuses_unsupported_adapter_kinds(tmp_path, kind, key):
    path = raw(tmp_path / "x.safetensors", {**_pair(KS), key: torch.ones(8, 2)})
    with pytest.raises(UnsupportedFormatError) as e:
        read_lora(path)
    names_file_and_key(e, path, key)
    assert kind in str(e.value)


def test_refuses_unknown_keys_listing_three(tmp_path):
    bad = {f"model.layer{i}.weight": torch.ones(2) for i in range(5)}
    path = raw(tmp_path / "x.safetensors", {**_pair(KS), **bad})
    with pytest.raises(UnsupportedFormatError) as e:
        read_lora(path)
    names_file_and_key(e, path, "model.layer0.weight")
    assert "model.layer2.weight" in str(e.value) and "model.layer3.weight" not in str(e.value)
    assert "2 more" in str(e.value)


def test_refuses_mixed_formats(tmp_path):
    path = raw(tmp_path / "x.safetensors", {**_pair(KS), **_pair("unet.mid_block.attentions.0.proj_in", "lora_A.weight", "lora_B.weight")})
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
    path = raw(tmp_path / "x.safetensors", {**_pair(KS), f"{KS}.alpha": torch.tensor(1.0), emb: torch.randn(2, 768)})
    lf = read_lora(path)
    assert list(lf.modules) == [KS]
    assert emb in lf.dropped and "embedding" in lf.dropped[emb]


# ----------------------------------------------------------------------------- invalid files


def _cases():
    k = KS
    yield "rank mismatch", {f"{k}.lora_down.weight": torch.randn(4, 8), f"{k}.lora_up.weight": torch.randn(8, 2)}, f"{k}.lora_up.weight"
    yield "3-D", {f"{k}.lora_down.weight": torch.randn(4, 8, 3), f"{k}.lora_up.weight": torch.randn(8, 4)}, f"{k}.lora_down.weight"
    yield "conv up not 1x1", {f"{k}.lora_down.weight": torch.randn(4, 8, 3, 3), f"{k}.lora_up.weight": torch.randn(8, 4, 3, 3)}, f"{k}.lora_up.weight"
    yield "conv down, linear up", {f"{k}.lora_down.weight": torch.randn(4, 8, 3, 3), f"{k}.lora_up.weight": torch.randn(8, 4)}, f"{k}.lora_up.weight"
    yield "missing up", {f"{k}.lora_down.weight": torch.randn(4, 8)}, f"{k}.lora_down.weight"
    yield "missing down", {f"{k}.lora_up.weight": torch.randn(8, 4), f"{k}.alpha": torch.tensor(4.0)}, f"{k}.lora_up.weight"
    yield "zero rank", {f"{k}.lora_down.weight": torch.randn(0, 8), f"{k}.lora_up.weight": torch.randn(8, 0)}, f"{k}.lora_down.weight"
    nan = torch.randn(4, 8)
    nan[1, 2] = float("nan")
    yield "NaN", {f"{k}.lora_down.weight": nan, f"{k}.lora_up.weight": torch.randn(8, 4)}, f"{k}.lora_down.weight"
    inf = torch.randn(8, 4).half()
    inf[0, 0] = float("inf")
    yield "Inf fp16", {f"{k}.lora_down.weight": torch.randn(4, 8).half(), f"{k}.lora_up.weight": inf}, f"{k}.lora_up.weight"
    yield "alpha NaN", {**_pair(k, r=4), f"{k}.alpha": torch.tensor(float("nan"))}, f"{k}.alpha"
    yield "alpha vector", {**_pair(k, r=4), f"{k}.alpha": torch.tensor([1.0, 2.0])}, f"{k}.alpha"
    yield "orphan alpha", {**_pair(k, r=4), "lora_unet_other.alpha": torch.tensor(1.0)}, "lora_unet_other.alpha"
    p = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    yield "same module twice (old diffusers spellings)", {
        **_pair(f"{p}.processor.to_q_lora", "down.weight", "up.weight"),
        **_pair(f"{p}.to_q.lora", "down.weight", "up.weight")}, f"{p}.to_q.lora.down.weight"
    c = "diffusion_model.input_blocks.1.1.proj_in"
    yield "same module twice (comfy lora_A and lora_down)", {
        **_pair(c), **_pair(c, "lora_A.weight", "lora_B.weight")}, f"{c}.lora_A.weight"
    yield "peft bias shape", {**_pair("unet.conv_in", "lora_A.weight", "lora_B.weight", r=4),
                              "unet.conv_in.lora_B.bias": torch.randn(3)}, "unet.conv_in.lora_B.bias"


@pytest.mark.parametrize("what,tensors,key", list(_cases()), ids=[c[0] for c in _cases()])
def test_invalid_lora_errors_name_file_and_key(tmp_path, what, tensors, key):
    path = raw(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(InvalidLoraError) as e:
        read_lora(path)
    names_file_and_key(e, path, key)


def test_peft_metadata_rank_disagreeing_with_tensors_is_invalid(tmp_path):
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 8, "unet.target_modules": ["conv_in"]})}
    path = raw(tmp_path / "bad.safetensors", _pair("unet.conv_in", "lora_A.weight", "lora_B.weight", r=4), meta)
    with pytest.raises(InvalidLoraError) as e:
        read_lora(path)
    names_file_and_key(e, path, "unet.conv_in")
    assert "lora_adapter_metadata" in str(e.value)


def test_writer_refuses_keys_not_spelled_for_the_format(tmp_path):
    m = mod("unet.conv_in", 8, 8, 2)
    for fmt in ("kohya", "comfy"):
        with pytest.raises(InvalidLoraError) as e:
            write_lora(tmp_path / "o.safetensors", lora_file("peft", [m]), fmt)
        names_file_and_key(e, tmp_path / "o.safetensors", "unet.conv_in")
    with pytest.raises(OptionError):
        write_lora(tmp_path / "o.safetensors", lora_file("peft", [m]), "lycoris")
    assert not (tmp_path / "o.safetensors").exists()


def test_writer_never_overwrites_its_input(tmp_path):
    path = tmp_path / "in.safetensors"
    write_lora(path, lora_file("kohya", [mod(KS, 8, 8, 2, 1.0)]))
    lf = read_lora(path)
    with pytest.raises(OutputPathError):
        write_lora(path, lf)


# ----------------------------------------------------------------------------- old diffusers names


def test_old_diffusers_spellings_normalise_to_dotted_paths(tmp_path):
    u = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
    t = "text_encoder.text_model.encoder.layers.0"
    tensors = {
        **_pair(f"{u}.attn1.processor.to_q_lora", "down.weight", "up.weight"),
        **_pair(f"{u}.attn1.processor.to_out_lora", "down.weight", "up.weight"),
        **_pair(f"{u}.attn2.to_k.lora", "down.weight", "up.weight"),
        **_pair(f"{t}.self_attn.to_v_lora", "down.weight", "up.weight"),
        **_pair(f"{t}.self_attn.out_proj.lora_linear_layer", "down.weight", "up.weight"),
        **_pair(f"{t}.mlp.fc1.lora_linear_layer", "down.weight", "up.weight"),
        f"{u}.attn1.processor.to_q_lora.alpha": torch.tensor(1.0),
        f"{t}.mlp.fc1.alpha": torch.tensor(0.5),
    }
    lf = read_lora(raw(tmp_path / "old.safetensors", tensors))
    assert lf.format == "diffusers-old"
    assert sorted(lf.modules) == sorted([
        f"{u}.attn1.to_q", f"{u}.attn1.to_out.0", f"{u}.attn2.to_k",
        f"{t}.self_attn.v_proj", f"{t}.self_attn.out_proj", f"{t}.mlp.fc1",
    ])
    assert lf.modules[f"{u}.attn1.to_q"].alpha == 1.0
    assert lf.modules[f"{t}.mlp.fc1"].alpha == 0.5
    assert lf.modules[f"{u}.attn2.to_k"].alpha is None


# ----------------------------------------------------------------------------- scale semantics


KEYS = {
    "kohya": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
    "peft": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "diffusers-old": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "comfy": "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q",
}


@pytest.mark.parametrize("fmt", list(KEYS))
@pytest.mark.parametrize("alpha,r", [(4.0, 8), (None, 8), (3.0, 5), (64.0, 4)])
def test_merged_delta_is_the_same_in_every_format(tmp_path, fmt, alpha, r):
    m = mod(KEYS[fmt], 64, 48, r, alpha)
    conv = mod(KEYS[fmt].replace("to_q", "to_k"), 64, 48, r, alpha, conv=(3, 3))
    path = tmp_path / "o.safetensors"
    write_lora(path, lora_file(fmt, [m, conv]))
    back = read_lora(path)
    for src in (m, conv):
        got = back.modules[src.key]
        assert close(dw(got), dw(src))
        assert torch.equal(got.down, src.down)
        if fmt in ("comfy", "diffusers-old"):  # no alpha in the file: the scale is in up
            assert got.alpha is None


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(st.tuples(st.integers(1, 6), st.one_of(st.none(), st.floats(0.01, 128.0)),
                                st.sampled_from([None, (1, 1), (3, 3)])), min_size=1, max_size=4),
       src_fmt=st.sampled_from(list(KEYS)), dst_fmt=st.sampled_from(list(KEYS)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_property_any_format_to_any_format_keeps_every_delta(tmp_path_factory, specs, src_fmt, dst_fmt, dtype):
    d = tmp_path_factory.mktemp("prop")
    src = [mod(f"{KEYS[src_fmt]}{i}", 12, 10, r, alpha, conv, dtype) for i, (r, alpha, conv) in enumerate(specs)]
    write_lora(d / "a.safetensors", lora_file(src_fmt, src))
    first = read_lora(d / "a.safetensors")
    # re-spell the keys for the destination format, as a caller does, then write again
    moved = [LoraModule(f"{KEYS[dst_fmt]}{i}", m.down, m.up, m.alpha) for i, m in enumerate(first.modules.values())]
    write_lora(d / "b.safetensors", lora_file(dst_fmt, moved))
    second = read_lora(d / "b.safetensors")
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # folding a scale into bf16 up rounds it
    for m, got in zip(src, second.modules.values()):
        assert got.down.dtype == dtype and torch.equal(got.down, m.down)
        assert close(dw(got), dw(m), tol)


def test_header_length_128_mod_256_is_not_a_pickle(tmp_path):
    """About 1 in 32 valid files has a header length that is 128 mod 256, so its first byte is 0x80."""
    m = mod(KS, 8, 8, 2, 1.0)
    path = tmp_path / "x.safetensors"
    for n in range(64):
        write_lora(path, lora_file("kohya", [m], {"pad": "x" * n}))
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert read_lora(path).modules[KS].alpha == 1.0


def test_comfy_folds_half_scale_exactly(tmp_path):
    m = mod(KEYS["comfy"], 64, 48, 8, 4.0, dtype=torch.float16)
    path = tmp_path / "c.safetensors"
    write_lora(path, lora_file("comfy", [m], dtype=torch.float16))
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {f"{m.key}.lora_up.weight", f"{m.key}.lora_down.weight"}
        assert torch.equal(f.get_tensor(f"{m.key}.lora_up.weight"), m.up * 0.5)


# ----------------------------------------------------------------------------- metadata


def test_kohya_ss_dims_and_alphas_updated_only_when_stale(tmp_path):
    meta = {"ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_base_model_version": "sd_v1",
            "lora_adapter_metadata": json.dumps({"unet.r": 8})}
    same = [mod(KS, 8, 8, 8, 4.0)]
    path = tmp_path / "a.safetensors"
    write_lora(path, lora_file("kohya", same, meta))
    md = read_lora(path).metadata
    assert md["ss_network_dim"] == "8" and md["ss_network_alpha"] == "4.0"
    assert "lora_adapter_metadata" not in md  # diffusers refuses kohya alphas + adapter metadata together

    smaller = [mod(KS, 8, 8, 4, 2.0), mod(KS + "_x", 8, 8, 4, 2.0)]
    write_lora(tmp_path / "b.safetensors", lora_file("kohya", smaller, meta))
    md = read_lora(tmp_path / "b.safetensors").metadata
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0" and md["ss_base_model_version"] == "sd_v1"

    mixed = [mod(KS, 8, 8, 4, 2.0), mod(KS + "_x", 8, 8, 8, 1.0)]
    write_lora(tmp_path / "c.safetensors", lora_file("kohya", mixed, meta))
    md = read_lora(tmp_path / "c.safetensors").metadata
    assert md["ss_network_dim"] == "Dynamic" and md["ss_network_alpha"] == "Dynamic"

    locon = [mod(KS, 8, 8, 8, 4.0), mod(KS + "_conv", 8, 8, 2, 1.0, conv=(3, 3)), mod(KS + "_1x1", 8, 8, 8, 4.0, conv=(1, 1))]
    write_lora(tmp_path / "e.safetensors", lora_file("kohya", locon, meta))
    md = read_lora(tmp_path / "e.safetensors").metadata
    assert md["ss_network_dim"] == "8" and md["ss_network_alpha"] == "4.0"  # 3x3 conv dims live in ss_network_args

    write_lora(tmp_path / "d.safetensors", lora_file("kohya", mixed, {"modelspec.title": "t"}))
    md = read_lora(tmp_path / "d.safetensors").metadata
    assert md == {"modelspec.title": "t"}  # nothing invented


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
    assert meta["unet.alpha_pattern"] == {"^mid_block.attentions.0.proj_in": 2}
    assert meta["text_encoder.r"] == 2 and meta["text_encoder.lora_alpha"] == 2  # alpha None -> scale 1
    assert meta["text_encoder.target_modules"] == ["encoder.layers.0.self_attn.q_proj"]
    back = read_lora(path)
    assert [back.modules[m.key].scale for m in mods] == [1.0, 1.0, 0.25, 1.0]


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
        assert (r, a) == (m.rank, m.alpha), name
    back = read_lora(path)
    assert [back.modules[m.key].alpha for m in mods] == [4.0, 2.0, 2.0]


def test_peft_reads_diffusers_written_metadata(tmp_path):
    """Metadata as diffusers' save_lora_weights writes it (per-component LoraConfig, `^` patterns)."""
    cfg = {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"^mid_block.attentions.0.proj_in": 2},
           "unet.alpha_pattern": {"mid_block.attentions.0.proj_in": 1}, "unet.target_modules": ["proj_in", "proj_out"],
           "unet.use_rslora": False, "unet.peft_type": "LORA",
           "text_encoder.r": 4, "text_encoder.lora_alpha": 4, "text_encoder.use_rslora": True,
           "text_encoder.rank_pattern": {}, "text_encoder.alpha_pattern": {}}
    tensors = {**_pair("unet.down_blocks.0.attentions.0.proj_in", "lora_A.weight", "lora_B.weight", r=4),
               **_pair("unet.mid_block.attentions.0.proj_in", "lora_A.weight", "lora_B.weight", r=2),
               **_pair("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "lora_A.weight", "lora_B.weight", r=4)}
    lf = read_lora(raw(tmp_path / "d.safetensors", tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(cfg)}))
    assert lf.modules["unet.down_blocks.0.attentions.0.proj_in"].scale == 2.0
    assert lf.modules["unet.mid_block.attentions.0.proj_in"].scale == 0.5
    assert math.isclose(lf.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].scale, 4 / math.sqrt(4))


def test_peft_model_level_file_uses_unprefixed_metadata(tmp_path):
    """unet.save_lora_adapter() writes keys and LoraConfig without a component prefix."""
    tensors = _pair("down_blocks.0.attentions.0.proj_in", "lora_A.weight", "lora_B.weight", r=4)
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 2, "target_modules": ["proj_in"]})}
    lf = read_lora(raw(tmp_path / "m.safetensors", tensors, meta))
    assert lf.modules["down_blocks.0.attentions.0.proj_in"].scale == 0.5
    write_lora(tmp_path / "m2.safetensors", lf)
    assert read_lora(tmp_path / "m2.safetensors").modules["down_blocks.0.attentions.0.proj_in"].scale == 0.5


# ----------------------------------------------------------------------------- summary


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


# ----------------------------------------------------------------------------- diffusers interop

diffusers = pytest.importorskip("diffusers")


def interop(test):
    """Ignore peft's harmless notes about several adapters sharing the tiny models."""
    for text in ("Already found a `peft_config` attribute", "`lora_bias=True` was passed but the targeted layer"):
        test = pytest.mark.filterwarnings(f"ignore:{text}")(test)
    return test


def _quiet_diffusers():
    from diffusers.utils import logging as dlog
    dlog.set_verbosity_error()
    try:
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="module")
def tiny():
    """Tiny models with SD1.5 / SDXL block structure (so real module names exist), small widths."""
    _quiet_diffusers()
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    sd1 = UNet2DConditionModel(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=48,
                               attention_head_dim=8, sample_size=8, layers_per_block=2)
    sdxl = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), norm_num_groups=8, layers_per_block=2, sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), cross_attention_dim=80, attention_head_dim=(2, 4, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=96)
    te_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    te = CLIPTextModel(CLIPTextConfig(**te_cfg))  # flattened in recent transformers (no .text_model)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**te_cfg, "hidden_size": 48, "projection_dim": 16}))
    return {"sd1": sd1, "sdxl": sdxl, "te": te, "te2": te2}


def _load_with_diffusers(pipeline_cls, path: Path, unet, encoders: dict, adapter: str):
    """What pipeline.load_lora_weights does, without a pipeline: lora_state_dict + per-component loads."""
    sd, alphas, meta = pipeline_cls.lora_state_dict(str(path), unet_config=unet.config, return_lora_metadata=True)
    pipeline_cls.load_lora_into_unet(dict(sd), alphas, unet, adapter_name=adapter, metadata=meta)
    for prefix, encoder in encoders.items():
        pipeline_cls.load_lora_into_text_encoder(dict(sd), alphas, encoder, prefix=prefix, adapter_name=adapter,
                                                 metadata=meta)
    return sd, alphas, meta


def _peft_delta(model, name: str, adapter: str) -> torch.Tensor:
    layer = model.get_submodule(name)
    a, b = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
    return layer.scaling[adapter] * (b.double().flatten(1) @ a.double().flatten(1))


def _te_name(encoder, dotted: str) -> str:
    """The encoder's own module name for a `text_model.`-prefixed path (CLIPTextModel may be flattened)."""
    return dotted if hasattr(encoder, "text_model") else dotted.removeprefix("text_model.")


@interop
def test_diffusers_reads_kohya_sd1_file(tmp_path, tiny):
    from diffusers import StableDiffusionPipeline

    a = "down_blocks_1_attentions_0_transformer_blocks_0"
    mods = [mod(f"lora_unet_{a}_attn1_to_q", 64, 64, 8, 4.0),
            mod(f"lora_unet_{a}_attn2_to_k", 64, 48, 4, 4.0),
            mod(f"lora_unet_{a}_attn1_to_out_0", 64, 64, 8, 4.0),
            mod("lora_unet_down_blocks_1_attentions_0_proj_in", 64, 64, 4, 8.0, conv=(1, 1)),
            mod("lora_unet_down_blocks_1_resnets_0_conv1", 64, 32, 4, 1.0, conv=(3, 3)),
            mod("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32, 4, 2.0),
            mod("lora_te_text_model_encoder_layers_0_self_attn_out_proj", 32, 32, 4, 2.0),
            mod("lora_te_text_model_encoder_layers_1_mlp_fc1", 64, 32, 2, 2.0)]
    # per-module alphas differ only where diffusers can apply them (see the test below)
    path = tmp_path / "kohya_sd1.safetensors"
    write_lora(path, lora_file("kohya", mods, {"ss_network_dim": "Dynamic"}))
    unet, te = tiny["sd1"], tiny["te"]
    sd, alphas, meta = _load_with_diffusers(StableDiffusionPipeline, path, unet, {"text_encoder": te}, "k_sd1")
    assert meta is None  # no lora_adapter_metadata: diffusers takes the alphas from the .alpha keys
    assert f"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight" in sd
    assert "unet.down_blocks.1.resnets.0.conv1.lora.down.weight" in sd
    assert alphas["unet.down_blocks.1.attentions.0.proj_in.alpha"] == 8.0
    assert alphas["text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight.alpha"] == 2.0
    targets = {
        mods[0].key: (unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
        mods[1].key: (unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
        mods[2].key: (unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"),
        mods[3].key: (unet, "down_blocks.1.attentions.0.proj_in"),
        mods[4].key: (unet, "down_blocks.1.resnets.0.conv1"),
        mods[5].key: (te, _te_name(te, "text_model.encoder.layers.0.self_attn.q_proj")),
        mods[6].key: (te, _te_name(te, "text_model.encoder.layers.0.self_attn.out_proj")),
        mods[7].key: (te, _te_name(te, "text_model.encoder.layers.1.mlp.fc1")),
    }
    for m in mods:
        model, name = targets[m.key]
        assert close(_peft_delta(model, name, "k_sd1"), dw(m)), m.key


@interop
def test_diffusers_reads_kohya_sdxl_sgm_file(tmp_path, tiny):
    from diffusers import StableDiffusionXLPipeline

    mods = [mod("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 64, 64, 8, 4.0),
            mod("lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_v", 64, 80, 8, 4.0),
            mod("lora_unet_middle_block_1_transformer_blocks_0_ff_net_2", 64, 256, 4, 4.0),
            mod("lora_unet_output_blocks_0_1_proj_out", 64, 64, 4, 2.0),
            mod("lora_unet_input_blocks_4_0_in_layers_2", 64, 32, 4, 4.0, conv=(3, 3)),
            mod("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", 32, 32, 4, 4.0),
            mod("lora_te1_text_model_encoder_layers_0_self_attn_out_proj", 32, 32, 4, 4.0),
            mod("lora_te2_text_model_encoder_layers_1_self_attn_v_proj", 48, 48, 8, 2.0),
            mod("lora_te2_text_model_encoder_layers_1_self_attn_out_proj", 48, 48, 8, 2.0),
            mod("lora_te2_text_model_encoder_layers_1_mlp_fc2", 48, 64, 8, 16.0)]
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    path = tmp_path / "kohya_sdxl.safetensors"
    write_lora(path, lora_file("kohya", mods, meta))
    assert summarize(read_lora(path))["family"] == "sdxl"
    unet, te, te2 = tiny["sdxl"], tiny["te"], tiny["te2"]
    sd, alphas, _ = _load_with_diffusers(StableDiffusionXLPipeline, path, unet,
                                         {"text_encoder": te, "text_encoder_2": te2}, "k_sdxl")
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight" in sd
    assert "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2.lora.down.weight" in sd
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_linear_layer.down.weight" in sd
    assert alphas["text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_linear_layer.down.weight.alpha"] == 16.0
    targets = [(unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
               (unet, "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_v"),
               (unet, "mid_block.attentions.0.transformer_blocks.0.ff.net.2"),
               (unet, "up_blocks.0.attentions.0.proj_out"),
               (unet, "down_blocks.1.resnets.0.conv1"),
               (te, _te_name(te, "text_model.encoder.layers.0.self_attn.k_proj")),
               (te, _te_name(te, "text_model.encoder.layers.0.self_attn.out_proj")),
               (te2, _te_name(te2, "text_model.encoder.layers.1.self_attn.v_proj")),
               (te2, _te_name(te2, "text_model.encoder.layers.1.self_attn.out_proj")),
               (te2, _te_name(te2, "text_model.encoder.layers.1.mlp.fc2"))]
    for m, (model, name) in zip(mods, targets):
        assert close(_peft_delta(model, name, "k_sdxl"), dw(m)), m.key


@interop
def test_diffusers_misapplies_nonuniform_kohya_alphas(tmp_path, tiny):
    """diffusers 0.42 uses each component's most common kohya alpha as lora_alpha and relies on an
    alpha_pattern for the others, but builds wrong pattern keys for UNet attention projections
    (`attn1.processor.to_v_lora.down.weight`), for text-encoder attention (the `self_attn` parent)
    and, with transformers' flattened CLIPTextModel, for text-encoder MLPs (`text_model.` kept).
    Those modules silently get the most common alpha. Our file is right (prolora reads it back
    exactly, and diffusers reports the right alpha values); diffusers applies the wrong one.
    Uniform alphas per component, or the peft format, avoid it. If this fails, diffusers fixed it."""
    from diffusers import StableDiffusionPipeline

    a = "down_blocks_2_attentions_1_transformer_blocks_0"
    t = "lora_te_text_model_encoder_layers_1"
    mods = [mod(f"lora_unet_{a}_attn1_to_q", 64, 64, 4, 4.0), mod(f"lora_unet_{a}_attn1_to_k", 64, 64, 4, 4.0),
            mod(f"lora_unet_{a}_attn1_to_v", 64, 64, 4, 1.0),
            mod(f"{t}_self_attn_q_proj", 32, 32, 4, 4.0), mod(f"{t}_self_attn_k_proj", 32, 32, 4, 4.0),
            mod(f"{t}_self_attn_v_proj", 32, 32, 4, 1.0), mod(f"{t}_self_attn_out_proj", 32, 32, 4, 4.0),
            mod(f"{t}_mlp_fc2", 32, 64, 4, 2.0)]
    path = tmp_path / "k.safetensors"
    write_lora(path, lora_file("kohya", mods))
    assert [m.alpha for m in read_lora(path).modules.values()] == [m.alpha for m in mods]
    te = tiny["te"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, alphas, _ = _load_with_diffusers(StableDiffusionPipeline, path, tiny["sd1"], {"text_encoder": te}, "k_bug")
    assert sorted(alphas.values()) == sorted(m.alpha for m in mods)
    unet_v = tiny["sd1"].get_submodule("down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_v")
    assert unet_v.scaling["k_bug"] == 1.0  # should be 0.25 (alpha 1 / rank 4)
    te_v = te.get_submodule(_te_name(te, "text_model.encoder.layers.1.self_attn.v_proj"))
    assert te_v.scaling["k_bug"] == 1.0  # should be 0.25


@interop
def test_diffusers_needs_out_proj_in_kohya_text_encoder_attention(tmp_path):
    """diffusers 0.42 recognises kohya text-encoder attention LoRAs by the presence of `out_proj`
    (its `to_out_lora`): q/k/v modules without one are silently dropped when an MLP module is
    present, and the load fails outright when not. A transfer should keep whole attention sets."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    _quiet_diffusers()
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    t = "lora_te_text_model_encoder_layers_1"
    for extra, outcome in (([mod(f"{t}_mlp_fc2", 32, 64, 4, 4.0)], "dropped"), ([], "error")):
        path = tmp_path / f"{outcome}.safetensors"
        write_lora(path, lora_file("kohya", [mod(f"{t}_self_attn_q_proj", 32, 32, 4, 4.0), *extra]))
        te = CLIPTextModel(cfg)
        sd, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
        if outcome == "error":
            with pytest.raises(ValueError, match="infer state dict type"):
                StableDiffusionPipeline.load_lora_into_text_encoder(sd, alphas, te, prefix="text_encoder")
        else:
            StableDiffusionPipeline.load_lora_into_text_encoder(sd, alphas, te, prefix="text_encoder")
            assert hasattr(te.get_submodule(_te_name(te, "text_model.encoder.layers.1.mlp.fc2")), "lora_A")
            assert not hasattr(te.get_submodule(_te_name(te, "text_model.encoder.layers.1.self_attn.q_proj")), "lora_A")


@interop
def test_diffusers_reads_peft_file_scales_exactly(tmp_path, tiny):
    from diffusers import StableDiffusionXLPipeline

    mods = [mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 64, 64, 8, 4.0),
            mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", 64, 64, 8, 4.0),
            mod("unet.down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k", 64, 80, 4, 1.0),
            mod("unet.down_blocks.1.attentions.0.proj_in", 64, 64, 16, 4.0),
            mod("unet.down_blocks.1.resnets.1.conv2", 64, 64, 4, 8.0, conv=(3, 3)),
            mod("unet.mid_block.attentions.0.proj_out", 64, 64, 8, 4.0, bias=True),
            mod("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 32, 32, 4, 2.0),
            mod("text_encoder.text_model.encoder.layers.1.mlp.fc1", 64, 32, 8, 2.0),
            mod("text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj", 48, 48, 4, None),
            mod("text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj", 48, 48, 2, 8.0)]
    path = tmp_path / "peft.safetensors"
    write_lora(path, lora_file("peft", mods))
    unet, te, te2 = tiny["sdxl"], tiny["te"], tiny["te2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. peft's "pattern matched no module"
        sd, alphas, meta = _load_with_diffusers(StableDiffusionXLPipeline, path, unet,
                                                {"text_encoder": te, "text_encoder_2": te2}, "p")
    assert alphas is None and meta["unet.r"] == 8 and "text_encoder_2.rank_pattern" in meta
    assert set(sd) == {f"{m.key}.lora_{x}.weight" for m in mods for x in "AB"} | {f"{mods[5].key}.lora_B.bias"}
    models = {"unet": unet, "text_encoder": te, "text_encoder_2": te2}
    for m in mods:
        component, name = m.key.split(".", 1)
        model = models[component]
        if component != "unet":
            name = _te_name(model, name)
        assert close(_peft_delta(model, name, "p"), dw(m)), m.key
    assert torch.equal(unet.get_submodule("mid_block.attentions.0.proj_out").lora_B["p"].bias, mods[5].bias)
    # lora_bias is per component in LoraConfig: the other UNet modules get a bias slot, left at zero
    assert not unet.get_submodule(mods[0].key.split(".", 1)[1]).lora_B["p"].bias.any()


@interop
def test_diffusers_reads_old_diffusers_file_with_folded_scale(tmp_path, tiny):
    from diffusers import StableDiffusionPipeline

    mods = [mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 64, 64, 8, 4.0),
            mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", 64, 64, 8, 4.0),
            mod("unet.down_blocks.1.attentions.0.proj_in", 64, 64, 4, 2.0, conv=(1, 1)),
            mod("text_encoder.text_model.encoder.layers.0.self_attn.v_proj", 32, 32, 4, 1.0),
            mod("text_encoder.text_model.encoder.layers.0.mlp.fc2", 32, 64, 4, 8.0)]
    path = tmp_path / "old.safetensors"
    write_lora(path, lora_file("diffusers-old", mods))
    unet, te = tiny["sd1"], tiny["te"]
    sd, alphas, meta = _load_with_diffusers(StableDiffusionPipeline, path, unet, {"text_encoder": te}, "o")
    assert alphas is None and meta is None
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.up.weight" in sd
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_linear_layer.down.weight" in sd
    for m in mods:
        component, name = m.key.split(".", 1)
        model = unet if component == "unet" else te
        if component != "unet":
            name = _te_name(model, name)
        assert close(_peft_delta(model, name, "o"), dw(m)), m.key


@interop
def test_diffusers_cannot_load_comfy_files_for_sd_pipelines(tmp_path, tiny):
    """diffusers' SD/SDXL loaders do not know the ComfyUI `diffusion_model.` layout: lora_state_dict
    passes the keys through untouched and the UNet loader finds no `unet.` keys, so nothing is
    loaded (only a warning is logged). Comfy output is for ComfyUI; use kohya or peft for diffusers."""
    from diffusers import StableDiffusionXLPipeline

    mods = [mod("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q", 64, 64, 4),
            mod("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", 32, 32, 4)]
    path = tmp_path / "comfy.safetensors"
    write_lora(path, lora_file("comfy", mods))
    sd, alphas, meta = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=tiny["sdxl"].config,
                                                                return_lora_metadata=True)
    assert set(sd) == {f"{m.key}.lora_{x}.weight" for m in mods for x in ("up", "down")}
    assert alphas is None and meta is None
    from diffusers import UNet2DConditionModel

    fresh = UNet2DConditionModel(block_out_channels=(32, 32), norm_num_groups=8, cross_attention_dim=16,
                                 layers_per_block=1, sample_size=8,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    StableDiffusionXLPipeline.load_lora_into_unet(dict(sd), alphas, fresh, adapter_name="c", metadata=meta)
    assert getattr(fresh, "peft_config", None) is None  # nothing was attached


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_by_one_reduction(dtype):
    """The sum-based check: the largest finite values pass (no overflow of the accumulator), and
    any NaN or Inf, or an Inf and a -Inf together, is caught."""
    from prolora.formats.common import all_finite

    assert all_finite(torch.full((100, 16), torch.finfo(dtype).max, dtype=dtype))
    assert all_finite(torch.full((100, 16), torch.finfo(dtype).min, dtype=dtype))
    assert all_finite(torch.empty(0, 4, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(7, 5).to(dtype)
        t[3, 2] = bad
        assert not all_finite(t)
    t = torch.randn(7, 5).to(dtype)
    t[0, 0], t[1, 1] = float("inf"), float("-inf")
    assert not all_finite(t)
