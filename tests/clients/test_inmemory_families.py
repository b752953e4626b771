"""In-memory targets (issue 17) for Qwen-Image and Wan: a LoRA transferred onto a diffusers
QwenImageEditPipeline, a Wan 2.1 WanPipeline (one transformer) and a Wan 2.2 A14B WanPipeline (two
experts), all built with diffusers from synthetic folders written in float32 (so that the
pipeline's weights are the files' values and dtype, and both share one identity).

The reference is the file path: prolora transfers onto the target's files (for Wan 2.2 through
experts.transfer_experts, one output per expert), diffusers loads each output with the pipeline's
own `load_lora_weights` (`load_into_transformer_2=True` for the low-noise expert) and fuses it.
`prolora.diffusers.load_lora` must fuse the same weights with the target's folder deleted once the
pipeline is loaded, key the basis cache by the same identity (so the warm in-memory run reads no
weight), and on bad input leave the pipeline as it was, on both experts. On a (fake) cuda Wan 2.2
pipeline neither expert's weights come to the host.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import prolora  # noqa: E402
import prolora.diffusers  # noqa: E402
from prolora.families import open_model  # noqa: E402
from prolora.families import in_memory_model  # noqa: E402
from prolora.families.wan.experts import expert_targets  # noqa: E402
from prolora.errors import LoraMismatchError, ModelError, ProloraError  # noqa: E402
from prolora.experts import transfer_experts  # noqa: E402
from prolora.options import TransferOptions  # noqa: E402
from prolora.families.qwen_image.synthetic import write_qwen_lora, write_qwen_model  # noqa: E402
from prolora.families.wan.synthetic import write_wan22_experts, write_wan_lora, write_wan_model  # noqa: E402
from inmemory_common import (assert_same_weights, changed_keys, one_line, pipeline_weights, quiet,  # noqa: E402
                             same_model)

pytestmark = pytest.mark.usefixtures("one_thread")
F32 = torch.float32


def qwen_pipeline(folder: Path):
    """diffusers' QwenImageEditPipeline around the folder's transformer (no VAE, text encoder or
    processor: loading and fusing LoRAs needs none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(folder / "transformer", local_files_only=True,
                                                              torch_dtype=F32)
    return QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                 tokenizer=None, processor=None, transformer=transformer)


def wan_pipeline(folder: Path):
    """diffusers' WanPipeline of the folder's transformer/ and, where there is one, transformer_2/
    (Wan 2.2 A14B: high-noise and low-noise experts, boundary_ratio as WanPipeline takes it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    experts = {c: WanTransformer3DModel.from_pretrained(folder / c, local_files_only=True, torch_dtype=F32)
               for c in ("transformer", "transformer_2") if (folder / c).is_dir()}
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       boundary_ratio=0.875 if len(experts) == 2 else None, **experts)


PIPELINES = {"qwen": qwen_pipeline, "wan21": wan_pipeline, "wan22": wan_pipeline}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """{kind: {source, target, lora}}: Qwen-Image -> Qwen-Image-Edit (musubi kohya LoRA on every
    linear), Wan 2.1 (a ComfyUI single file) -> a Wan 2.1 fine-tune folder and -> a Wan 2.2 A14B
    folder with both experts (diffusers PEFT LoRA); one basis cache for the module."""
    quiet()
    d = tmp_path_factory.mktemp("inmemory_families")
    qsrc = write_qwen_model(d / "qwen-image", "qwen-image:tiny", dtype=F32, seed=1)
    qtgt = write_qwen_model(d / "qwen-image-edit", "qwen-image-edit:tiny", dtype=F32, seed=1, base=qsrc,
                            perturbation=0.05)
    wsrc = write_wan_model(d / "wan2.1_t2v_14B.safetensors", layout="single-file-prefixed", dtype=F32, seed=2)
    wlora = write_wan_lora(wsrc, d / "wan_lora.safetensors", "peft", rank=4, seed=4)
    return {"qwen": {"source": qsrc, "target": qtgt,
                     "lora": write_qwen_lora(qsrc, d / "qwen_lora.safetensors", "kohya", rank=4, targets="all",
                                             seed=3)},
            "wan21": {"source": wsrc, "lora": wlora,
                      "target": write_wan_model(d / "wan21_ft", dtype=F32, seed=2, base=wsrc, perturbation=0.05)},
            "wan22": {"source": wsrc, "lora": wlora,
                      "target": write_wan22_experts(d / "wan22", dtype=F32, seed=2, base=wsrc)["pipeline"]},
            "cache": str(d / "cache")}


def _fused(pipe, adapters: list[str]) -> dict[str, torch.Tensor]:
    """The weights after fuse_lora on every denoiser the pipeline has, and unload_lora_weights."""
    components = [c for c in ("transformer", "transformer_2") if getattr(pipe, c, None) is not None]
    pipe.fuse_lora(components=components, adapter_names=adapters)
    pipe.unload_lora_weights()
    return pipeline_weights(pipe)


def _by_files(kind: str, d: dict, cache: str, out_dir: Path) -> dict:
    """The file path: {expert label or "": (TransferResult, output file, target's identity)}."""
    if kind == "wan22":
        experts = expert_targets(d["target"])
        res = transfer_experts(d["source"], experts, d["lora"], out_dir / "out.safetensors",
                               TransferOptions(cache_dir=cache))
        return {label: (r, r.output, open_model(experts[label]).identity()) for label, r in res.results.items()}
    out = out_dir / "out.safetensors"
    return {"": (prolora.transfer(d["source"], d["target"], d["lora"], out, cache_dir=cache), out,
                 open_model(d["target"]).identity())}


@pytest.mark.parametrize("kind", ["qwen", "wan21", "wan22"])
def test_load_lora_fuses_what_the_file_transfer_fuses(kind, fam, tmp_path):
    d, cache = fam[kind], fam["cache"]
    _by_files(kind, d, cache, tmp_path)  # warms the basis cache (cached bases are float32, as in test_inmemory)
    again = tmp_path / "again"
    again.mkdir()
    files = _by_files(kind, d, cache, again)
    reference = PIPELINES[kind](d["target"])
    untouched = pipeline_weights(reference)
    for label, (_, out, _) in files.items():
        kw = {"load_into_transformer_2": True} if label == "low_noise" else {}
        reference.load_lora_weights(str(out), adapter_name="x", **kw)
    want = _fused(reference, ["x"])
    changed = changed_keys(want, untouched)
    assert len(changed) >= sum(r.report.summary()["transferred"] for r, _, _ in files.values()) > 0
    if kind == "wan22":  # both experts adapted
        assert {k.partition(".")[0] for k in changed} == {"transformer", "transformer_2"}

    copy = tmp_path / "target_copy"  # the pipeline's folder is gone once it is loaded
    shutil.copytree(d["target"], copy)
    pipe = PIPELINES[kind](copy)
    shutil.rmtree(copy)
    got = prolora.diffusers.load_lora(pipe, d["lora"], source=d["source"], adapter_name="x", cache_dir=cache)
    reports = got if kind == "wan22" else {"": got}
    assert reports.keys() == files.keys()
    for label, report in reports.items():
        by_file, _, identity = files[label]
        assert report.info["adapter_name"] == "x" and report.info.get("expert") == (label or None)
        assert report.summary()["transferred"] == by_file.report.summary()["transferred"] > 0
        # the same identity as the files, so the file transfer's cache entries served every basis
        assert report.info["target_id"] == by_file.report.info["target_id"] == identity
        assert report.info["engine"]["bytes_read"] == 0
    expected = {"transformer", "transformer_2"} if kind == "wan22" else {"transformer"}
    assert {c for c, names in pipe.get_list_adapters().items() if "x" in names} == expected
    assert_same_weights(_fused(pipe, ["x"]), want, 1e-6)


@pytest.mark.parametrize("kind", ["qwen", "wan21", "wan22"])
def test_the_pipeline_is_read_as_its_folder(kind, fam):
    """The in-memory model is the folder reader's: weights, family, LoRA spellings, identity, values;
    a Wan 2.2 pipeline holds both experts as its folder does, and each expert module is the expert's
    own folder."""
    d = fam[kind]
    pipe = PIPELINES[kind](d["target"])
    model = in_memory_model(pipe)
    same_model(model, open_model(d["target"]))
    if kind == "qwen":
        assert (model.family, model.variant) == ("qwen-image", "edit")
        same_model(in_memory_model((pipe.transformer.state_dict(), pipe.transformer.config)),
                    open_model(d["target"] / "transformer"))
    else:
        assert model.family == "wan"
    if kind == "wan22":
        assert model.experts == {"high_noise": "transformer", "low_noise": "transformer_2"}
        assert model.facts["boundary_ratio"] == 0.875
        same_model(in_memory_model(pipe.transformer_2), open_model(d["target"] / "transformer_2"))
        with pytest.raises(ProloraError, match="pipe.transformer_2") as e:  # no single target: one per expert
            prolora.transfer(d["source"], pipe, d["lora"], cache_dir=fam["cache"])
        one_line(e)


def _state(pipe) -> tuple[dict, dict]:
    return pipe.get_list_adapters(), pipeline_weights(pipe)


def _unchanged(pipe, before: tuple[dict, dict]) -> None:
    adapters, weights = before
    assert pipe.get_list_adapters() == adapters
    assert changed_keys(pipeline_weights(pipe), weights) == []


@pytest.mark.parametrize("kind", ["qwen", "wan21", "wan22"])
def test_bad_input_leaves_the_pipeline_as_it_was(kind, fam):
    """A pipeline already holding an adapter 'keep' (on both experts for Wan 2.2): a LoRA of the
    other family (with the pipeline's source) and a source of the other family are refused in
    one line, and the pipeline keeps exactly its adapters and weights."""
    d, cache = fam[kind], fam["cache"]
    other = fam["wan21" if kind == "qwen" else "qwen"]
    pipe = PIPELINES[kind](d["target"])
    prolora.diffusers.load_lora(pipe, d["lora"], source=d["source"], adapter_name="keep", cache_dir=cache)
    before = _state(pipe)
    cases = [(dict(lora=other["lora"], source=d["source"]), LoraMismatchError,
              "LoRA for another model|transfers between models of its own family"),
             (dict(lora=d["lora"], source=other["source"]), ModelError, "cross-family")]
    for kw, error, pattern in cases:
        with pytest.raises(error, match=pattern) as e:
            prolora.diffusers.load_lora(pipe, cache_dir=cache, **kw)
        one_line(e)
        _unchanged(pipe, before)


def test_a_failure_on_the_second_expert_removes_the_adapter_from_both(fam, monkeypatch):
    """diffusers loads the high-noise expert's LoRA, then fails on the low-noise one: load_lora
    deletes the adapter from the first expert too and says so in one line; 'keep', loaded before
    on both experts, stays."""
    d = fam["wan22"]
    pipe = wan_pipeline(d["target"])
    # an adapter loaded before (so that PEFT's wrapping is there before and after)
    prolora.diffusers.load_lora(pipe, d["lora"], source=d["source"], adapter_name="keep", cache_dir=fam["cache"])
    before = _state(pipe)
    real = pipe.load_lora_weights

    def fails_on_transformer_2(state, adapter_name=None, **kw):
        if kw.get("load_into_transformer_2"):
            assert adapter_name in pipe.get_list_adapters()["transformer"]
            raise ValueError("simulated failure on the low-noise expert")
        real(state, adapter_name=adapter_name, **kw)

    monkeypatch.setattr(pipe, "load_lora_weights", fails_on_transformer_2)
    with pytest.raises(LoraMismatchError, match="simulated failure") as e:
        prolora.diffusers.load_lora(pipe, d["lora"], source=d["source"], adapter_name="new", cache_dir=fam["cache"])
    one_line(e)
    _unchanged(pipe, before)


def test_a_qwen_image_21_module_is_refused_in_one_line():
    """Qwen-Image-2.1's transformer (another layout) is named, not misread as Qwen-Image."""
    state = {"txt_in.text_norm.weight": torch.ones(4), "img_in.weight": torch.zeros(4, 4)}
    with pytest.raises(ModelError, match="Qwen-Image-2.1") as e:
        in_memory_model((state, {}))
    one_line(e)


def _deltas(pipe, adapter: str) -> dict[str, torch.Tensor]:
    """scale * B @ A of every layer of either expert the adapter adapts, on the host, in float64."""
    return {f"{c}.{name}": layer.scaling[adapter] * (layer.lora_B[adapter].weight.detach().cpu().double()
                                                     @ layer.lora_A[adapter].weight.detach().cpu().double())
            for c in ("transformer", "transformer_2")
            for name, layer in getattr(pipe, c).named_modules() if hasattr(layer, "lora_A") and adapter in layer.lora_A}


def test_fake_cuda_wan22_experts_never_come_to_the_host(fam):
    """A Wan 2.2 pipeline moved to (fake) cuda: both transfers run there by default and read each
    expert where it is. Device-to-host bytes are exactly the finished factors of both experts plus
    the identity's few sampled elements per weight and each basis's spectrum; the adapters are the CPU run's."""
    from prolora.checkpoints.model import sample_runs
    from prolora.fake_cuda import FakeCuda

    d = fam["wan22"]
    on_cpu = wan_pipeline(d["target"])
    prolora.diffusers.load_lora(on_cpu, d["lora"], source=d["source"], adapter_name="x", cache=False)
    want = _deltas(on_cpu, "x")
    pipe = wan_pipeline(d["target"])
    model = in_memory_model(pipe)  # both experts: transformer.* and transformer_2.*
    target_bytes = sum(r.numel for r in model.weights.values()) * 4
    sampled = sum(n for ref in model.weights.values() for _, n in sample_runs(ref)) * 4
    with FakeCuda() as fc:
        pipe.to("cuda")
        assert pipe.transformer_2.proj_out.weight.is_cuda and fc.ledger.d2h_bytes == 0
        reports = prolora.diffusers.load_lora(pipe, d["lora"], source=d["source"], adapter_name="x", cache=False)
        d2h, host = fc.ledger.d2h_bytes, list(fc.ledger.host_compute)  # before the test's own host check
        got = _deltas(pipe, "x")
    assert {r.info["device"] for r in reports.values()} == {"cuda"} and host == [], host[:3]
    factors = 4 * sum(m.lora_A["x"].weight.numel() + m.lora_B["x"].weight.numel()
                      for c in ("transformer", "transformer_2") for m in getattr(on_cpu, c).modules()
                      if hasattr(m, "lora_A") and "x" in m.lora_A)
    spectra = 2 * 8 * sum(min(m.base_layer.weight.shape) + 1  # each basis's spectrum and energy, float64
                          for c in ("transformer", "transformer_2") for m in getattr(on_cpu, c).modules()
                          if hasattr(m, "lora_A") and "x" in m.lora_A)
    assert d2h == factors + sampled + spectra < target_bytes, (d2h, factors, sampled, spectra, target_bytes)
    assert got.keys() == want.keys() and {k.partition(".")[0] for k in got} == {"transformer", "transformer_2"}
    for k in want:
        err = float((got[k] - want[k]).norm() / want[k].norm())
        assert err < 1e-4, f"{k}: {err:.2e}"
