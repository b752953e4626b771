"""What diffusers (the real client) makes of the files prolora writes, format by format: tiny UNets
and CLIP text encoders with SD1.5 / SDXL block structure load kohya, PEFT and old-diffusers files
with the scale we wrote, and the cases diffusers gets wrong or refuses are pinned."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lora_samples import close, dw, lora_file, mod

from prolora.formats import read_lora, summarize, write_lora


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
