"""The SD family (families/sd/) against REAL diffusers / transformers models of SD1.5, SDXL and SSD-1B
(tiny configs of each, tests/zoo.py): every layout read (pipeline folders, single LDM/SGM files,
shards, fp16 variants, bare UNets), every weight present with its shape and value, the LoRA key
spellings both ways (kohya LDM / diffusers, PEFT, ComfyUI), identity, and one-line errors.

The single-file variants are written with our own diffusers -> LDM/SGM map, and that map is
checked against diffusers' own loader (`from_single_file`) and CLIP converters.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModelWithProjection  # noqa: E402
from zoo import FAMILY, SPECS, TE2, canon, write_single_file  # noqa: E402
from zoo import build as _build, save_pipeline as _save_pipeline, state as _state  # noqa: E402

from prolora.families import open_model  # noqa: E402
from prolora.families.sd.model import KOHYA, SPELLINGS  # noqa: E402
from prolora.errors import ModelError, PickleRefusedError, ProloraError  # noqa: E402
from prolora.safetensors_io import save  # noqa: E402


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Every layout of every family, plus the original state dicts."""
    root = tmp_path_factory.mktemp("zoo")
    out = {}
    for kind in SPECS:
        mods = _build(kind, seed=1)
        state = _state(mods)
        d = root / kind
        entry = {"state": state, "pipeline": _save_pipeline(mods, d / "pipeline")}
        entry["single"] = write_single_file(state, d / f"{kind}.safetensors")
        entry["unet_ldm"] = write_single_file(state, d / "unet_ldm.safetensors", ("unet",), prefix_override="")
        save(d / "unet_diffusers.safetensors", state["unet"])
        entry["unet_diffusers"] = d / "unet_diffusers.safetensors"
        if kind != "ssd":
            entry["sharded"] = _save_pipeline(mods, d / "sharded", max_shard_size="100KB")
            half = {c: m.half() for c, m in _build(kind, seed=1).items()}
            entry["fp16_only"] = _save_pipeline(half, d / "fp16", variant="fp16")
            both = _save_pipeline(mods, d / "both")
            for c, m in half.items():
                m.save_pretrained(both / c, variant="fp16")
            entry["both"] = both
        out[kind] = entry
    return out


def _expected_weights(state) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{canonical module id: (state-dict key, shape)} for every linear/conv weight."""
    exp = {}
    for comp, sd in state.items():
        for k, v in sd.items():
            if k.endswith(".weight") and v.dim() in (2, 4) and ".embeddings." not in canon(k):
                exp[f"{comp}.{canon(k)[:-7]}"] = (k, tuple(v.shape))
    return exp


# ------------------------------------------------------------------ our map against diffusers


@pytest.mark.parametrize("kind", list(SPECS))
def test_single_file_unet_loads_in_diffusers_identically(zoo, kind):
    e = zoo[kind]
    # offline: a local file plus `config=` a local folder holding the UNet's config.json
    unet = UNet2DConditionModel.from_single_file(str(e["single"]), config=str(e["pipeline"] / "unet"),
                                                 local_files_only=True)
    got = unet.state_dict()
    want = e["state"]["unet"]
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_single_file_text_encoders_match_diffusers_converters(zoo, kind):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from safetensors.torch import load_file

    e = zoo[kind]
    ckpt = load_file(e["single"])
    te1 = convert_ldm_clip_checkpoint(ckpt)
    assert set(te1) == {canon(k) for k in e["state"]["text_encoder"]}
    for k, v in e["state"]["text_encoder"].items():
        assert torch.equal(te1[canon(k)], v), k
    if kind == "sdxl":
        model = CLIPTextModelWithProjection(CLIPTextConfig(**TE2))
        te2 = convert_open_clip_checkpoint(model, ckpt, prefix="conditioner.embedders.1.model.")
        want = e["state"]["text_encoder_2"]
        assert set(te2) == set(want)
        for k, v in want.items():
            assert torch.equal(te2[k], v), k


# ------------------------------------------------------------------ weights, shapes, loads

LAYOUTS = ["pipeline", "single", "sharded", "fp16_only", "both"]


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("layout", LAYOUTS + ["unet_ldm", "unet_diffusers", "unet_folder"])
def test_every_weight_present_with_shape_and_value(zoo, kind, layout):
    e = zoo[kind]
    if layout == "unet_folder":
        path = e["pipeline"] / "unet"
    elif layout not in e:
        pytest.skip("layout not built for this family")
    else:
        path = e[layout]
    unet_only = layout.startswith("unet")
    state = {"unet": e["state"]["unet"]} if unet_only else e["state"]
    with open_model(path) as m:
        exp = _expected_weights(state)
        assert {k: v.shape for k, v in m.weights.items()} == {k: s for k, (_, s) in exp.items()}
        assert m.layout == ("single-file" if layout in ("single", "unet_ldm", "unet_diffusers") else "diffusers")
        # a UNet without text encoders is recognised by its blocks alone
        assert m.family == FAMILY[kind]
        for module in list(exp)[:: max(1, len(exp) // 40)] + [k for k in exp if "q_proj" in k or "projection" in k]:
            w = m.load(module)
            assert w.dtype == torch.float32 and tuple(w.shape) == exp[module][1]
            ref = state[module.partition(".")[0]][exp[module][0]].float()
            if layout == "fp16_only":
                ref = ref.half().float()
            assert torch.equal(w, ref), module


def test_full_precision_preferred_over_fp16_variant(zoo):
    with open_model(zoo["sdxl"]["both"]) as m:
        assert {r.dtype for r in m.weights.values()} == {"F32"}
        assert all(".fp16" not in str(r.file) for r in m.weights.values())
    with open_model(zoo["sdxl"]["fp16_only"]) as m:
        assert {r.dtype for r in m.weights.values()} == {"F16"}
        assert m.load("unet.conv_in", dtype=torch.float16).dtype == torch.float16


def test_sharded_reads_every_shard(zoo):
    with open_model(zoo["sd15"]["sharded"]) as m:
        shards = {r.file for r in m.weights.values() if r.module.startswith("unet.")}
        assert len(shards) > 3
        assert len(m.describe()["files"]) >= len(shards)


def test_openclip_qkv_are_row_slices(zoo):
    with open_model(zoo["sdxl"]["single"]) as m:
        h = TE2["hidden_size"]
        for i, p in enumerate("qkv"):
            ref = m.weights[f"text_encoder_2.text_model.encoder.layers.1.self_attn.{p}_proj"]
            assert ref.key == "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
            assert ref.rows == (i * h, (i + 1) * h) and ref.shape == (h, h)
        proj = m.weights["text_encoder_2.text_projection"]
        assert proj.transposed and proj.shape == (TE2["projection_dim"], h)


def test_open_reads_headers_only(zoo, monkeypatch):
    import safetensors

    def boom(*a, **k):
        raise AssertionError("tensor data opened during open_model")

    monkeypatch.setattr(safetensors, "safe_open", boom)
    for layout in ("pipeline", "single", "sharded"):
        m = open_model(zoo["sdxl"][layout])
        assert m.weights and not m._handles


def test_describe(zoo):
    with open_model(zoo["sdxl"]["single"]) as m:
        d = m.describe()
    assert d["family"] == "sdxl" and d["layout"] == "single-file"
    assert d["transformer_blocks"] == {"down": [0, 2, 4], "mid": 2, "up": [6, 3, 0], "total": 17}
    assert d["components"]["text_encoder_2"]["layers"] == 3
    assert d["cross_attention_dim"] == 96 and d["dtypes"] == {"F32": len(m.weights)}
    with open_model(zoo["ssd"]["pipeline"]) as m:
        d = m.describe()
    assert d["transformer_blocks"]["mid"] == 0 and d["transformer_blocks"]["up"] == [7, 4, 0]


# ------------------------------------------------------------------ spellings


@pytest.mark.parametrize("kind,layout", [("sd15", "pipeline"), ("sd15", "single"), ("sdxl", "pipeline"),
                                         ("sdxl", "single"), ("ssd", "single"), ("sdxl", "unet_ldm")])
def test_resolve_spell_round_trip(zoo, kind, layout):
    with open_model(zoo[kind][layout]) as m:
        seen = set()
        for module in m.weights:
            for spelling in SPELLINGS:
                key = m.spell(module, spelling)
                got = m.resolve(key)
                assert got is not None and got[0] == module, (module, spelling, key)
                if module.startswith("unet.") or spelling not in KOHYA:
                    assert got[1] == spelling
                else:
                    assert got[1] == m.kohya_spelling
                seen.add(key)
        assert m.resolve("lora_unet_nothing_here") is None
        assert m.resolve("unet.down_blocks.9.attentions.0.proj_in") is None


def test_same_spellings_from_single_file_and_folder(zoo):
    with open_model(zoo["sdxl"]["single"]) as a, open_model(zoo["sdxl"]["pipeline"]) as b:
        assert set(a.weights) == set(b.weights)
        for module in a.weights:
            for s in SPELLINGS:
                assert a.spell(module, s) == b.spell(module, s)


def test_kohya_names_sdxl_match_formats_doc(zoo):
    with open_model(zoo["sdxl"]["pipeline"]) as m:
        assert m.kohya_spelling == "kohya-ldm"
        cases = {
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k":
                "unet.mid_block.attentions.0.transformer_blocks.1.attn2.to_k",
            "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_0_proj":
                "unet.up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
            "lora_unet_input_blocks_4_0_in_layers_2": "unet.down_blocks.1.resnets.0.conv1",
            "lora_unet_input_blocks_4_0_out_layers_3": "unet.down_blocks.1.resnets.0.conv2",
            "lora_unet_input_blocks_4_0_emb_layers_1": "unet.down_blocks.1.resnets.0.time_emb_proj",
            "lora_unet_input_blocks_4_0_skip_connection": "unet.down_blocks.1.resnets.0.conv_shortcut",
            "lora_unet_input_blocks_3_0_op": "unet.down_blocks.0.downsamplers.0.conv",
            "lora_unet_output_blocks_2_2_conv": "unet.up_blocks.0.upsamplers.0.conv",
            "lora_unet_input_blocks_7_1_proj_in": "unet.down_blocks.2.attentions.0.proj_in",
            "lora_unet_label_emb_0_0": "unet.add_embedding.linear_1",
            "lora_unet_time_embed_2": "unet.time_embedding.linear_2",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
            "lora_te2_text_model_encoder_layers_2_mlp_fc1": "text_encoder_2.text_model.encoder.layers.2.mlp.fc1",
            "lora_te2_text_projection": "text_encoder_2.text_projection",
            "diffusion_model.output_blocks.5.1.proj_out": "unet.up_blocks.1.attentions.2.proj_out",
            "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.out_proj":
                "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj",
        }
        for key, module in cases.items():
            assert m.resolve(key) is not None and m.resolve(key)[0] == module, key
            if key.startswith("lora_"):
                assert m.spell(module, "kohya-ldm") == key
        # OneTrainer-style SDXL files use diffusers names: resolved too
        assert m.resolve("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") == (
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "kohya-diffusers")


def test_kohya_names_sd1(zoo):
    with open_model(zoo["sd15"]["single"]) as m:
        assert m.kohya_spelling == "kohya-diffusers"
        mod = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        assert m.spell(mod, "kohya-diffusers") == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        assert m.spell(mod, "kohya-ldm") == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
        te = "text_encoder.text_model.encoder.layers.1.mlp.fc2"
        assert m.spell(te, "kohya-diffusers") == "lora_te_text_model_encoder_layers_1_mlp_fc2"
        assert m.resolve("lora_te1_text_model_encoder_layers_1_mlp_fc2")[0] == te
        assert m.spell(te, "comfy") == "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc2"
        # SD1's first up block has no attention: its upsampler is .1.conv
        assert m.spell("unet.up_blocks.0.upsamplers.0.conv", "comfy") == "diffusion_model.output_blocks.2.1.conv"
        assert m.spell("unet.up_blocks.1.upsamplers.0.conv", "comfy") == "diffusion_model.output_blocks.5.2.conv"
        with pytest.raises(ValueError):
            m.spell(mod, "kohya")
        with pytest.raises(ModelError):
            m.spell("unet.nope", "peft")


# ------------------------------------------------------------------ identity


def test_identity(zoo, tmp_path):
    a = open_model(zoo["sdxl"]["single"])
    first = a.identity()
    assert first == a.identity() and len(first) == 64
    assert open_model(zoo["sdxl"]["single"]).identity() == first
    copy = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(zoo["sdxl"]["single"], copy)
    assert open_model(copy).identity() == first  # content, not path
    other = write_single_file(_state(_build("sdxl", seed=2)), tmp_path / "other.safetensors")
    assert open_model(other).identity() != first  # same architecture, other weights
    # a change confined to one small tensor (a one-layer fine-tune) still changes the identity
    # (identity samples bytes; a change of a single element is not guaranteed to be seen)
    state = {c: dict(sd) for c, sd in zoo["sdxl"]["state"].items()}
    k = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    state["unet"][k] = state["unet"][k] * 1.01
    one = write_single_file(state, tmp_path / "one.safetensors")
    assert open_model(one).identity() != first
    p = open_model(zoo["sdxl"]["pipeline"])
    # the same weights as a diffusers folder (OpenCLIP q/k/v and text_projection stored apart):
    # the same identity, since it hashes the canonical weights, not the layout
    assert p.identity() == open_model(zoo["sdxl"]["pipeline"]).identity() == first


# ------------------------------------------------------------------ errors


def _one_line(err: Exception, path) -> None:
    msg = str(err)
    assert "\n" not in msg and str(path) in msg


def test_errors(zoo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError) as e:
        open_model(empty)
    _one_line(e.value, empty)

    nounet = tmp_path / "vae.safetensors"
    save(nounet, {"first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)})
    with pytest.raises(ModelError) as e:
        open_model(nounet)
    _one_line(e.value, nounet)
    assert "a VAE, not a diffusion model" in str(e.value)  # no family claims it; it says what it looks like

    broken = tmp_path / "broken"
    shutil.copytree(zoo["sd15"]["sharded"], broken)
    shard = sorted((broken / "unet").glob("diffusion_pytorch_model-0000*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelError) as e:
        open_model(broken)
    _one_line(e.value, broken / "unet")
    assert shard.name in str(e.value)

    state = dict(zoo["sd15"]["state"])
    tensors = {"model.diffusion_model.input_blocks.99.0.in_layers.0.weight": torch.zeros(4)}
    src = open_model(zoo["sd15"]["single"])
    for ref in src.weights.values():
        tensors[ref.key] = torch.zeros(1)
    bad = tmp_path / "bad_index.safetensors"
    save(bad, tensors)
    with pytest.raises(ModelError) as e:
        open_model(bad)
    _one_line(e.value, bad)
    assert "input_blocks" in str(e.value)
    del state

    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(PickleRefusedError):
        open_model(pickled)
    binonly = tmp_path / "binonly"
    (binonly / "unet").mkdir(parents=True)
    (binonly / "model_index.json").write_text("{}")
    (binonly / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(PickleRefusedError) as e:
        open_model(binonly)
    _one_line(e.value, binonly / "unet")

    with pytest.raises(ProloraError):
        open_model(tmp_path / "missing")
    with open_model(zoo["sd15"]["single"]) as m:
        with pytest.raises(ModelError):
            m.load("unet.not_a_module")


def test_diffusers_unet_key_without_ldm_name_is_kept(zoo, tmp_path):
    state = dict(zoo["sd15"]["state"]["unet"])
    state["class_embedding.linear_1.weight"] = torch.zeros(128, 32)
    path = tmp_path / "unet_extra.safetensors"
    save(path, state)
    with open_model(path) as m:
        assert m.family == "sd1"
        module = "unet.class_embedding.linear_1"
        assert m.weights[module].shape == (128, 32)
        key = m.spell(module, "kohya-diffusers")
        assert m.resolve(key) == (module, "kohya-diffusers")
        with pytest.raises(ModelError, match="no LDM"):
            m.spell(module, "kohya-ldm")
        assert m.spell("unet.conv_in", "comfy") == "diffusion_model.input_blocks.0.0"


def test_old_sd1_text_encoder_names_without_text_model(zoo, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(zoo["sd15"]["single"])
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in tensors.items()}
    path = tmp_path / "old.safetensors"
    save(path, old)
    with open_model(path) as a, open_model(zoo["sd15"]["single"]) as b:
        assert set(a.weights) == set(b.weights) and a.family == "sd1"
        q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
        assert torch.equal(a.load(q), b.load(q))


