"""`--text-encoder FILE` as files circulate (refine/textenc.py, issue 27): each is recognised from
its keys and shapes and built into the same function transformers' own class computes from the
same weights.

- a T5 encoder in transformers names (as t5xxl_fp16.safetensors), and under a prefix;
- a CLIP text encoder stored in float8 (as t5xxl_fp8_e4m3fn / clip_l_fp8 files): upcast, equal to
  transformers' model holding the same float8-rounded weights; ComfyUI's scaled float8 (a
  `scale_weight` beside each weight) rescaled;
- CLIP's shipped byte-pair vocabulary tokenizes as CLIP does; GGUF and non-encoder files are
  refused in one line.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from prolora.errors import InputFileError  # noqa: E402
from prolora.refine.textenc import build, from_file  # noqa: E402
from prolora.refine.tokens import clip_tokenizer, random_ids  # noqa: E402
from prolora.safetensors_io import save  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=300, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(cfg).eval()


def _clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=500, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         eos_token_id=499, bos_token_id=498, pad_token_id=499)
    return CLIPTextModel(cfg).eval()


@pytest.mark.parametrize("prefix", ["", "text_encoders.t5xxl.transformer."])
def test_t5_file(tmp_path, prefix):
    ref = _t5()
    state = {prefix + k: v.contiguous() for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    path = tmp_path / "t5.safetensors"
    save(path, state)
    enc = from_file(path)
    assert (enc.kind, enc.facts["heads"], enc.facts["layers"], enc.facts["hidden"]) == ("t5", 4, 2, 32)
    enc.role = "t5"
    model = build(enc, "cpu", None)
    ids = random_ids(enc, 3, 12, seed=1)
    assert int(ids.max()) < 300 and (ids[:, -1] == 0).all()  # T5 pads with 0
    with torch.no_grad():
        assert torch.allclose(model(ids).last_hidden_state, ref(ids).last_hidden_state, atol=1e-5)


@pytest.mark.parametrize("scaled", [False, True])
def test_float8_clip_file(tmp_path, scaled):
    ref = _clip()
    state, rounded = {}, {}
    for k, v in ref.state_dict().items():
        if k.endswith("position_ids"):
            continue
        name = k if k.startswith("text_model.") else "text_model." + k
        if v.ndim == 2 and "embeddings" not in k:
            s = v.abs().max() / 448 if scaled else torch.tensor(1.0)
            q = (v / s).to(torch.float8_e4m3fn)
            state[name] = q
            if scaled:
                state[name[: -len("weight")] + "scale_weight"] = s.reshape(1)
            rounded[k] = q.to(torch.float32) * s
        else:
            state[name] = v.contiguous()
            rounded[k] = v
    if scaled:
        state["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "clip_fp8.safetensors"
    save(path, state)
    enc = from_file(path)
    assert enc.kind == "clip" and enc.facts["hidden"] == 64
    enc.role = "clip"
    model = build(enc, "cpu", None)
    ref.load_state_dict(rounded, strict=False)
    ids = random_ids(enc, 3, 77, seed=2)
    with torch.no_grad():
        a, b = model(ids, output_hidden_states=True), ref(ids, output_hidden_states=True)
    assert torch.allclose(a.last_hidden_state, b.last_hidden_state, atol=1e-4)
    assert torch.allclose(a.pooler_output, b.pooler_output, atol=1e-4)


def test_shipped_clip_vocabulary():
    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408


def test_refused_files(tmp_path):
    gguf = tmp_path / "t5.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(InputFileError, match="GGUF"):
        from_file(gguf)
    other = tmp_path / "vae.safetensors"
    save(other, {"decoder.conv_in.weight": torch.zeros(2, 2)})
    with pytest.raises(InputFileError, match="not a CLIP, OpenCLIP or T5"):
        from_file(other)
