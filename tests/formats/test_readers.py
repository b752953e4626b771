"""Reading LoRA files: what is refused and how (one line naming the file and the key: ranks that
disagree, shapes, NaN/Inf, alphas, a module spelled twice, ...), old diffusers spellings, the
scale of a module without alpha; and the same damage given to `prolora transfer` (exit 2, no
output; `small` is conftest's SDXL pair with a 12-module LoRA, tests/faults.py the helpers)."""
from __future__ import annotations

import pytest
import torch
from faults import K0, cli, files_in, lora_with, nan_in_up, nothing_matches, one_line_error
from lora_samples import KS, lora_file, mod, names_file_and_key, pair, raw
from safetensors.torch import save_file

from prolora.errors import InvalidLoraError
from prolora.formats import read_lora, write_lora


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
    yield "alpha NaN", {**pair(k, r=4), f"{k}.alpha": torch.tensor(float("nan"))}, f"{k}.alpha"
    yield "alpha vector", {**pair(k, r=4), f"{k}.alpha": torch.tensor([1.0, 2.0])}, f"{k}.alpha"
    yield "orphan alpha", {**pair(k, r=4), "lora_unet_other.alpha": torch.tensor(1.0)}, "lora_unet_other.alpha"
    p = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    yield "same module twice (old diffusers spellings)", {
        **pair(f"{p}.processor.to_q_lora", "down.weight", "up.weight"),
        **pair(f"{p}.to_q.lora", "down.weight", "up.weight")}, f"{p}.to_q.lora.down.weight"
    c = "diffusion_model.input_blocks.1.1.proj_in"
    yield "same module twice (comfy lora_A and lora_down)", {
        **pair(c), **pair(c, "lora_A.weight", "lora_B.weight")}, f"{c}.lora_A.weight"
    yield "peft bias shape", {**pair("unet.conv_in", "lora_A.weight", "lora_B.weight", r=4),
                              "unet.conv_in.lora_B.bias": torch.randn(3)}, "unet.conv_in.lora_B.bias"


@pytest.mark.parametrize("what,tensors,key", list(_cases()), ids=[c[0] for c in _cases()])
def test_invalid_lora_errors_name_file_and_key(tmp_path, what, tensors, key):
    path = raw(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(InvalidLoraError) as e:
        read_lora(path)
    names_file_and_key(e, path, key)


def test_old_diffusers_spellings_normalise_to_dotted_paths(tmp_path):
    u = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
    t = "text_encoder.text_model.encoder.layers.0"
    tensors = {
        **pair(f"{u}.attn1.processor.to_q_lora", "down.weight", "up.weight"),
        **pair(f"{u}.attn1.processor.to_out_lora", "down.weight", "up.weight"),
        **pair(f"{u}.attn2.to_k.lora", "down.weight", "up.weight"),
        **pair(f"{t}.self_attn.to_v_lora", "down.weight", "up.weight"),
        **pair(f"{t}.self_attn.out_proj.lora_linear_layer", "down.weight", "up.weight"),
        **pair(f"{t}.mlp.fc1.lora_linear_layer", "down.weight", "up.weight"),
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


# ----------------------------------------------------------------------------- through the command line


def _set(key, value):
    def change(t):
        t[key] = value
    return change


def _inf(t):
    down = t[f"{K0}.lora_down.weight"].clone()
    down[0, 5] = float("-inf")
    t[f"{K0}.lora_down.weight"] = down


def _zero_rank(t):
    t[f"{K0}.lora_down.weight"] = torch.zeros(0, 64, dtype=torch.float16)
    t[f"{K0}.lora_up.weight"] = torch.zeros(64, 0, dtype=torch.float16)


def _te_twice(t):  # the same SDXL text-encoder-1 module as lora_te_ and lora_te1_
    for prefix in ("lora_te_", "lora_te1_"):
        m = prefix + "text_model_encoder_layers_0_self_attn_q_proj"
        t[f"{m}.lora_down.weight"] = torch.randn(4, 32).half()
        t[f"{m}.lora_up.weight"] = torch.randn(32, 4).half()
        t[f"{m}.alpha"] = torch.tensor(2.0)


def _unet_twice(t):  # proj_in also in the kohya diffusers-style spelling
    m = "lora_unet_down_blocks_1_attentions_0_proj_in"
    for role in ("lora_down.weight", "lora_up.weight", "alpha"):
        t[f"{m}.{role}"] = t[f"{K0}.{role}"].clone()


def _conv_for_linear(t):
    t[f"{K0}.lora_down.weight"] = torch.randn(4, 64, 3, 3).half()
    t[f"{K0}.lora_up.weight"] = torch.randn(64, 4, 1, 1).half()


LORA_CASES = {
    # name: (edit, expected message part, key the message must name)
    "ranks_disagree": (_set(f"{K0}.lora_up.weight", torch.randn(64, 3).half()), "rank", f"{K0}.lora_up.weight"),
    "in_features_mismatch": (_set(f"{K0}.lora_down.weight", torch.randn(4, 65).half()), "does not fit", K0),
    "conv_geometry_for_linear": (_conv_for_linear, "is conv but the weight", K0),
    "conv_up_not_1x1": (_set(f"{K0}.lora_up.weight", torch.randn(64, 4, 3, 3).half()), "", f"{K0}.lora_up.weight"),
    "three_d": (_set(f"{K0}.lora_down.weight", torch.randn(4, 64, 1).half()), "2-D", f"{K0}.lora_down.weight"),
    "nan": (nan_in_up, "NaN or Inf", f"{K0}.lora_up.weight"),
    "inf": (_inf, "NaN or Inf", f"{K0}.lora_down.weight"),
    "zero_rank": (_zero_rank, "rank 0", f"{K0}.lora_down.weight"),
    "alpha_vector": (_set(f"{K0}.alpha", torch.tensor([2.0, 2.0])), "single number", f"{K0}.alpha"),
    "alpha_matrix": (_set(f"{K0}.alpha", torch.ones(1, 2)), "single number", f"{K0}.alpha"),
    "alpha_nan": (_set(f"{K0}.alpha", torch.tensor(float("nan"))), "finite", f"{K0}.alpha"),
    "alpha_bool": (_set(f"{K0}.alpha", torch.tensor(True)), "real number", f"{K0}.alpha"),
    "alpha_orphan": (_set("lora_unet_nowhere.alpha", torch.tensor(1.0)), "belongs to no module", "lora_unet_nowhere.alpha"),
    "integer_weights": (_set(f"{K0}.lora_down.weight", torch.ones(4, 64, dtype=torch.int32)), "floating point",
                        f"{K0}.lora_down.weight"),
    "up_missing": (lambda t: t.pop(f"{K0}.lora_up.weight"), "no matching up", f"{K0}.lora_down.weight"),
    "te_two_spellings": (_te_twice, "both adapt", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
    "unet_two_spellings": (_unet_twice, "both adapt", "lora_unet_down_blocks_1_attentions_0_proj_in"),
    "nothing_matches_source": (nothing_matches, "only 0 of 12 modules exist", "lora_unet_nowhere_9"),
    "unknown_keys": (_set("model.some_weight", torch.ones(2)), "no known LoRA format", "model.some_weight"),
    # a DoRA module is read (formats/test_adapters.py); one whose magnitude fits neither axis is not
    "dora_bad_shape": (_set(f"{K0}.dora_scale", torch.ones(3, 5).half()), "a dora_scale is", f"{K0}.dora_scale"),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_invalid_lora_content_one_line_error_no_output(small, tmp_path, capsys, case):
    edit, expect, key = LORA_CASES[case]
    bad = lora_with(small, tmp_path / f"{case}.safetensors", edit)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], bad, "-o", out, "--no-cache", "-q")
    assert code == 2
    one_line_error(err, str(bad), expect, key)
    assert files_in(out) == []


def test_empty_safetensors_is_no_lora(small, tmp_path, capsys):
    bad = tmp_path / "empty.safetensors"
    save_file({}, bad)
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], bad, "-o", tmp_path / "o.safetensors")
    assert code == 2
    one_line_error(err, str(bad), "holds no tensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_missing_alpha_means_scale_one_as_in_kohya(small, tmp_path, capsys):
    """A kohya module without `.alpha` is not an error: kohya/diffusers read it as alpha = rank."""
    lora = lora_with(small, tmp_path / "noalpha.safetensors", lambda t: t.pop(f"{K0}.alpha"))
    out = tmp_path / "o.safetensors"
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], lora, "-o", out, "--no-cache", "-q",
                       "--method", "copy")
    assert code == 0, err
    m = read_lora(out).modules[K0]
    assert m.alpha == m.rank == 4  # scale 1, the same dW as the input's
    assert read_lora(lora).modules[K0].alpha is None
