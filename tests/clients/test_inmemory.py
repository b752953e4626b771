"""In-memory targets (issue 17): a LoRA transferred onto a diffusers pipeline's own models.

Tiny SDXL and Flux pipelines are built with diffusers from the synthetic demo folders. The
reference path is the file one: transfer onto the target's files, write, `load_lora_weights(file)`,
`fuse_lora`. `prolora.diffusers.load_lora` must give the same fused weights with the target folder
deleted once the pipeline is loaded (so nothing of it is read from disk), share basis-cache entries
with the file transfer (same identity: the warm in-memory run reads no weight at all), leave loaded
adapters out of the target, and leave the pipeline as it was when anything fails.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import prolora  # noqa: E402
import prolora.diffusers  # noqa: E402
from prolora.families import open_model  # noqa: E402
from prolora.families import in_memory_model  # noqa: E402
from prolora.checkpoints.model import _ID_RUN_ELEMENTS, _ID_RUNS, sample_runs  # noqa: E402
from prolora.errors import LoraMismatchError, ModelError, OptionError, ProloraError  # noqa: E402
from prolora.fake_cuda import FakeCuda  # noqa: E402
from prolora.formats import read_lora  # noqa: E402
from prolora.safetensors_io import DTYPES, load_all  # noqa: E402
from prolora.synthetic import make_demo, write_lora, write_model, write_pair  # noqa: E402
from inmemory_common import (assert_same_weights, changed_keys, one_line, pipeline_weights, quiet,  # noqa: E402
                             same_model)

pytestmark = pytest.mark.usefixtures("one_thread")
README = Path(__file__).resolve().parents[2] / "README.md"


def _dtype(folder: Path) -> torch.dtype:
    (dtype,) = {r.dtype for r in open_model(folder).weights.values()}
    return DTYPES[dtype]


def sdxl_pipeline(folder: Path):
    """diffusers' StableDiffusionXLPipeline of the folder's UNet and CLIP encoders (no VAE or
    tokenizers: loading and fusing LoRAs needs neither), in the files' dtype."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    dtype = _dtype(folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, torch_dtype=dtype)
    te = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True, dtype=dtype)
    te2 = transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", local_files_only=True,
                                                                   dtype=dtype)
    return StableDiffusionXLPipeline(vae=None, text_encoder=te, text_encoder_2=te2, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=EulerDiscreteScheduler(), add_watermarker=False)


def flux_pipeline(folder: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", local_files_only=True,
                                                         torch_dtype=_dtype(folder / "transformer"))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


PIPELINES = {"sdxl": sdxl_pipeline, "flux": flux_pipeline}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """{kind: {source, target, lora}}: the SDXL demo (kohya LoRA) and a tiny FLUX.1-dev pair with a
    PEFT LoRA (whose alphas live in file metadata only), one basis cache for the module."""
    quiet()
    d = tmp_path_factory.mktemp("inmemory")
    out = {"sdxl": make_demo(d / "sdxl")}
    src, tgt = write_pair(d / "flux_source.safetensors", d / "flux_target", "flux-dev:tiny", seed=5)
    out["flux"] = {"source": src, "target": tgt,
                   "lora": write_lora(src, d / "flux_lora.safetensors", format="peft", rank=4, targets="all", seed=6)}
    out["cache"] = str(d / "cache")
    return out


def _fused(pipe, adapters: list[str]) -> dict[str, torch.Tensor]:
    """The weights after diffusers' fuse_lora and unload_lora_weights (plain names again)."""
    pipe.fuse_lora(adapter_names=adapters)
    pipe.unload_lora_weights()
    return pipeline_weights(pipe)


def _copy_loaded_then_deleted(folder: Path, tmp_path: Path, kind: str):
    """A pipeline loaded from a copy of `folder` that is deleted right after: nothing of the target
    can be read from disk afterwards."""
    copy = tmp_path / "target_copy"
    shutil.copytree(folder, copy)
    pipe = PIPELINES[kind](copy)
    shutil.rmtree(copy)
    return pipe


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_load_lora_fuses_what_the_file_transfer_fuses(kind, demo, tmp_path):
    d, cache = demo[kind], demo["cache"]
    # the file path: prolora transfer onto the target's files, diffusers loads the written output;
    # both paths run with a warm basis cache (cached bases are float32: a cold run differs ~1e-6)
    prolora.transfer(d["source"], d["target"], d["lora"], cache_dir=cache)
    out = tmp_path / "transferred.safetensors"
    by_file = prolora.transfer(d["source"], d["target"], d["lora"], out, cache_dir=cache)
    reference = PIPELINES[kind](d["target"])
    untouched = pipeline_weights(reference)
    reference.load_lora_weights(str(out), adapter_name="x")
    want = _fused(reference, ["x"])
    assert len(changed_keys(want, untouched)) >= by_file.report.summary()["transferred"] > 0

    # in memory: the target's folder is gone once the pipeline is loaded
    pipe = _copy_loaded_then_deleted(d["target"], tmp_path, kind)
    report = prolora.diffusers.load_lora(pipe, d["lora"], source=d["source"], adapter_name="x", cache_dir=cache)
    assert report.info["adapter_name"] == "x"
    assert report.summary()["transferred"] == by_file.report.summary()["transferred"]
    # same identity as the files, so the file transfer's cache entries served every basis
    assert report.info["target_id"] == by_file.report.info["target_id"] == open_model(d["target"]).identity()
    assert report.info["engine"]["bytes_read"] == 0
    # the adapter just loaded is not part of the target: its identity is the files' still
    assert in_memory_model(pipe).identity() == report.info["target_id"]
    assert_same_weights(_fused(pipe, ["x"]), want, 1e-6)


def test_several_loras_and_set_adapters(demo, tmp_path):
    """Two adapters from load_lora (the second excludes the first from its target) weighted 0.5
    each with set_adapters fuse into what the file transfer at weight 1 fuses."""
    d, cache = demo["sdxl"], demo["cache"]
    out = tmp_path / "transferred.safetensors"
    prolora.transfer(d["source"], d["target"], d["lora"], out, cache_dir=cache)
    reference = sdxl_pipeline(d["target"])
    reference.load_lora_weights(str(out), adapter_name="x")
    want = _fused(reference, ["x"])

    pipe = sdxl_pipeline(d["target"])
    first = prolora.diffusers.load_lora(pipe, d["lora"], source=d["source"], cache_dir=cache)
    second = prolora.diffusers.load_lora(pipe, read_lora(d["lora"]), source=d["source"], cache_dir=cache)
    assert (first.info["adapter_name"], second.info["adapter_name"]) == ("default_0", "default_1")
    assert second.info["target_id"] == first.info["target_id"]
    assert set(pipe.get_list_adapters()["unet"]) == {"default_0", "default_1"}
    pipe.set_adapters(["default_0", "default_1"], [0.5, 0.5])
    # two fuses round the fp16 weights twice (~2^-11 relative); a wrong weight would be off by
    # the size of the LoRA's change (~5% of the weight)
    assert_same_weights(_fused(pipe, ["default_0", "default_1"]), want, 2e-3)


def test_a_state_dict_lora_and_in_memory_targets_of_transfer(demo, tmp_path):
    """prolora.transfer takes a UNet module and (state_dict, config) as targets, and load_lora a
    LoRA state dict: the same output as from the unet/ folder, and the same identity."""
    d, cache = demo["sdxl"], demo["cache"]
    on_file = prolora.transfer(d["source"], d["target"] / "unet", d["lora"], cache_dir=cache)
    pipe = sdxl_pipeline(d["target"])
    unet = pipe.unet
    for target in (unet, (unet.state_dict(), unet.config)):
        res = prolora.transfer(d["source"], target, d["lora"], cache_dir=cache)
        assert res.report.info["target_id"] == on_file.report.info["target_id"]
        assert res.lora.modules.keys() == on_file.lora.modules.keys()
        for k, m in on_file.lora.modules.items():
            assert torch.equal(res.lora.modules[k].up, m.up) and torch.equal(res.lora.modules[k].down, m.down)
    tensors, _ = load_all(d["lora"])
    report = prolora.diffusers.load_lora(pipe, tensors, source=d["source"], adapter_name="sd", cache_dir=cache)
    assert report.info["lora"] is None and "sd" in pipe.get_list_adapters()["unet"]


def _deltas(pipe, adapter: str) -> dict[str, torch.Tensor]:
    """scale * B @ A of every layer the adapter adapts, on the host, in float64."""
    return {name: layer.scaling[adapter] * (layer.lora_B[adapter].weight.cpu().double()
                                            @ layer.lora_A[adapter].weight.cpu().double())
            for name, layer in pipe.transformer.named_modules()
            if hasattr(layer, "lora_A") and adapter in layer.lora_A}


def test_fake_cuda_pipeline_weights_never_come_to_the_host(demo):
    """A pipeline moved to (fake) cuda: load_lora runs there by default and reads the target's
    weights where they are. Device-to-host bytes are exactly the finished factors plus the
    identity's few sampled elements per weight and each basis's spectrum; the adapter is the CPU run's."""
    d = demo["flux"]
    on_cpu = flux_pipeline(d["target"])
    prolora.diffusers.load_lora(on_cpu, d["lora"], source=d["source"], adapter_name="x", cache=False)
    want = _deltas(on_cpu, "x")
    pipe = flux_pipeline(d["target"])
    model = in_memory_model(pipe)
    itemsize = pipe.transformer.x_embedder.weight.element_size()
    target_bytes = sum(r.numel for r in model.weights.values()) * itemsize
    # the identity's sample (the cache key; the report names the target by it even without a
    # cache): the only bytes of the target that come to the host
    sampled = sum(n for ref in model.weights.values() for _, n in sample_runs(ref)) * itemsize
    assert sampled <= len(model.weights) * _ID_RUNS * _ID_RUN_ELEMENTS * itemsize < target_bytes / 20
    with FakeCuda() as fc:
        pipe.to("cuda")
        assert pipe.transformer.x_embedder.weight.is_cuda and fc.ledger.d2h_bytes == 0
        report = prolora.diffusers.load_lora(pipe, d["lora"], source=d["source"], adapter_name="x", cache=False)
        d2h, host = fc.ledger.d2h_bytes, list(fc.ledger.host_compute)  # before the test's own host check
        got = _deltas(pipe, "x")
    assert report.info["device"] == "cuda" and host == [], host[:3]
    factors = 4 * sum(m.lora_A["x"].weight.numel() + m.lora_B["x"].weight.numel()
                      for m in on_cpu.transformer.modules() if hasattr(m, "lora_A") and "x" in m.lora_A)
    # each basis's spectrum and energy in float64 (k is chosen on the host), source and target
    spectra = 2 * 8 * sum(min(m.base_layer.weight.shape) + 1 for m in on_cpu.transformer.modules()
                          if hasattr(m, "lora_A") and "x" in m.lora_A)
    assert d2h == factors + sampled + spectra, (d2h, factors, sampled, spectra, target_bytes)
    assert got.keys() == want.keys() and got
    for k in want:
        err = float((got[k] - want[k]).norm() / want[k].norm())
        assert err < 1e-4, f"{k}: {err:.2e}"


def test_an_sd15_pipeline_is_read_as_its_folder(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    folder = write_model(tmp_path / "sd15", "sd15:tiny")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, torch_dtype=_dtype(folder))
    te = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=te, tokenizer=None, unet=unet,
                                   scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    model = in_memory_model(pipe)
    assert model.family == "sd1" and any(m.startswith("text_encoder.") for m in model.weights)
    same_model(model, open_model(folder))


def test_a_flux_pipeline_with_clip_and_t5_is_read_as_its_folder(demo, tmp_path):
    """CLIP-L in text_encoder, T5 in text_encoder_2, saved by transformers next to the transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    folder = tmp_path / "flux"
    shutil.copytree(demo["flux"]["target"], folder)
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
        max_position_embeddings=16, projection_dim=32))
    t5 = transformers.T5EncoderModel(transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                                           vocab_size=100, feed_forward_proj="gated-gelu"))
    clip.save_pretrained(folder / "text_encoder")
    t5.save_pretrained(folder / "text_encoder_2")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip, tokenizer=None,
                        text_encoder_2=t5, tokenizer_2=None, transformer=flux_pipeline(folder).transformer)
    model = in_memory_model(pipe)
    assert {m.partition(".")[0] for m in model.weights} == {"transformer", "text_encoder", "text_encoder_2"}
    same_model(model, open_model(folder))


def test_identity_is_the_weights_whatever_holds_them(tmp_path):
    """A BFL single file (q, k, v and the MLP input fused, the final modulation's halves swapped),
    the diffusers folder of the same weights and its module in memory: one identity, which a
    change of one weight changes."""
    single = open_model(write_model(tmp_path / "bfl.safetensors", "flux-dev:tiny", layout="single-file", seed=3))
    folder = write_model(tmp_path / "folder", "flux-dev:tiny", seed=3)
    transformer = flux_pipeline(folder).transformer
    assert single.identity() == open_model(folder).identity() == in_memory_model(transformer).identity()
    state = dict(transformer.state_dict())
    key = "single_transformer_blocks.1.proj_out.weight"
    state[key] = state[key] * 1.01
    assert in_memory_model((state, transformer.config)).identity() != single.identity()


def test_chroma_is_detected_from_the_module(tmp_path):
    from diffusers import ChromaTransformer2DModel

    folder = write_model(tmp_path / "chroma", "chroma:tiny")
    transformer = ChromaTransformer2DModel.from_pretrained(folder / "transformer", local_files_only=True,
                                                           torch_dtype=_dtype(folder))
    model = in_memory_model(transformer)
    assert model.family == "chroma"
    same_model(model, open_model(folder / "transformer"))


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def loaded(demo):
    """An SDXL pipeline that already holds an adapter 'keep' (so that 'left as it was' is not
    vacuous), and a snapshot of its adapters and weights."""
    d = demo["sdxl"]
    pipe = sdxl_pipeline(d["target"])
    prolora.diffusers.load_lora(pipe, d["lora"], source=d["source"], adapter_name="keep", cache_dir=demo["cache"])
    assert pipe.get_active_adapters() == ["keep"]
    return pipe, pipe.get_list_adapters(), pipeline_weights(pipe)


def _unchanged(pipe, adapters, weights) -> None:
    assert pipe.get_list_adapters() == adapters
    assert pipe.get_active_adapters() == sorted({a for names in adapters.values() for a in names})
    assert changed_keys(pipeline_weights(pipe), weights) == []


def test_bad_input_leaves_the_pipeline_as_it_was(demo, loaded):
    pipe, adapters, weights = loaded
    sdxl, flux, cache = demo["sdxl"], demo["flux"], demo["cache"]
    cases = [
        # a LoRA for another family (Flux LoRA, SDXL source and pipeline)
        (dict(lora=flux["lora"], source=sdxl["source"]), ProloraError, None),
        # a source of another family than the pipeline
        (dict(lora=sdxl["lora"], source=flux["source"]), ProloraError, "flux|sdxl"),
        (dict(lora=flux["lora"], source=flux["source"]), ProloraError, "flux|sdxl"),
        # an adapter name that is taken
        (dict(lora=sdxl["lora"], source=sdxl["source"], adapter_name="keep"), OptionError, "already loaded"),
    ]
    for kw, error, pattern in cases:
        with pytest.raises(error) as e:
            prolora.diffusers.load_lora(pipe, cache_dir=cache, **kw)
        one_line(e)
        if pattern:
            assert re.search(pattern, str(e.value), re.I), str(e.value)
        _unchanged(pipe, adapters, weights)
    with pytest.raises(ModelError) as e:
        prolora.diffusers.load_lora(object(), sdxl["lora"], source=sdxl["source"])
    one_line(e)


def test_a_pipeline_without_the_loras_modules(demo, tmp_path):
    """A LoRA on the text encoders only, onto an SDXL pipeline that has none: nothing to adapt."""
    from diffusers import StableDiffusionXLPipeline

    d, cache = demo["sdxl"], demo["cache"]
    tensors = load_all(d["lora"])[0]
    te_only = {k: v for k, v in tensors.items() if k.startswith("lora_te")}
    assert 0 < len(te_only) < len(tensors)
    base = sdxl_pipeline(d["target"])
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=base.unet, scheduler=base.scheduler)
    before = pipeline_weights(pipe)
    with pytest.raises(LoraMismatchError, match="no counterpart in the target") as e:
        prolora.diffusers.load_lora(pipe, te_only, source=d["source"], cache_dir=cache)
    one_line(e)
    _unchanged(pipe, {}, before)


def test_a_failure_inside_diffusers_removes_the_half_loaded_adapter(demo, loaded, monkeypatch):
    """diffusers fails after loading part of the adapter: load_lora deletes it and says so in one line."""
    pipe, adapters, weights = loaded
    d = demo["sdxl"]
    real = pipe.load_lora_weights

    def fails_after_loading(state, adapter_name=None, **kw):
        real(state, adapter_name=adapter_name, **kw)
        assert adapter_name in pipe.get_list_adapters()["unet"]
        raise ValueError("simulated failure after the UNet was adapted")

    monkeypatch.setattr(pipe, "load_lora_weights", fails_after_loading)
    with pytest.raises(LoraMismatchError, match="simulated failure") as e:
        prolora.diffusers.load_lora(pipe, d["lora"], source=d["source"], adapter_name="new", cache_dir=demo["cache"])
    one_line(e)
    _unchanged(pipe, adapters, weights)


# ----------------------------------------------------------------------------- README


def _readme_snippet() -> str:
    text = README.read_text()
    at = text.index("From Python, inside diffusers")
    return re.search(r"```python\n(.*?)```", text[at:], re.S).group(1)


def test_the_readme_example_runs(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROLORA_CACHE_DIR", demo["cache"])
    scope: dict = {}
    exec(compile(_readme_snippet(), str(README), "exec"), scope)  # noqa: S102
    pipe = scope["pipe"]
    assert set(pipe.get_list_adapters()["unet"]) >= {"demo"}
