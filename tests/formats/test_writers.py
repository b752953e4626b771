"""Writing LoRA files: every format round-trips (tensors, keys, alphas, metadata), gives the same
merged delta whatever the format and alpha, folds scales exactly where a format has no alpha,
keeps kohya's ss_* metadata true, refuses keys not spelled for the format and never overwrites
its input."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lora_samples import EXAMPLES, KEYS, KS, close, dw, lora_file, mod, names_file_and_key
from safetensors import safe_open

from prolora.errors import InvalidLoraError, OptionError, OutputPathError
from prolora.formats import read_lora, write_lora
from prolora.lora import LoraModule


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
        assert torch.equal(b.down, m.down)
        if fmt == "peft":  # written with the scale folded into up, alpha = rank (ComfyUI ignores the metadata)
            assert b.alpha == m.rank and close(dw(b), dw(m), 2e-3)
            continue
        assert torch.equal(b.up, m.up)
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


# ----------------------------------------------------------------------------- scale semantics


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


def test_comfy_folds_half_scale_exactly(tmp_path):
    m = mod(KEYS["comfy"], 64, 48, 8, 4.0, dtype=torch.float16)
    path = tmp_path / "c.safetensors"
    write_lora(path, lora_file("comfy", [m], dtype=torch.float16))
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {f"{m.key}.lora_up.weight", f"{m.key}.lora_down.weight"}
        assert torch.equal(f.get_tensor(f"{m.key}.lora_up.weight"), m.up * 0.5)


# ----------------------------------------------------------------------------- kohya metadata


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


