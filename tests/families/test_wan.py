"""Wan 2.1 -> Wan 2.2 A14B (two experts) and the TI2V-5B refusal, checked against diffusers.

The SOURCE is a tiny REAL diffusers WanTransformer3DModel of the 14B layout's structure (random
weights), saved as ComfyUI saves Wan single files: original Wan keys under `model.diffusion_model.`
(through this file's own hand-written key table, checked against diffusers' single-file converter).
The TARGET is a Wan 2.2 A14B-shaped pipeline folder written by diffusers' save_pretrained: a
high-noise expert in transformer/ and a low-noise one in transformer_2/, each the source plus its
own fine-tune-like change, and model_index.json with boundary_ratio. LoRAs in the formats trainers
write (diffusers/PEFT, musubi-tuner kohya, ComfyUI) go in; ONE transfer writes one LoRA per expert;
diffusers' WanPipeline loads each into its expert with its own loader (`load_lora_weights`, and
`load_into_transformer_2=True` for the low-noise expert), every module of the file must be adapted
(no key ignored) and the fused weights must equal target + dW, dW read from the file alone.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

import prolora  # noqa: E402
from prolora.api import inspect, similarity, transfer, transfer_files  # noqa: E402
from prolora.families import open_model  # noqa: E402
from prolora.families.wan.keys import diffusers_to_original  # noqa: E402
from prolora.cli import main  # noqa: E402
from prolora.errors import ModelError, OptionError  # noqa: E402
from prolora.options import TransferOptions  # noqa: E402
from prolora.safetensors_io import save  # noqa: E402
from prolora.families.wan.synthetic import (wan_config, wan_params, write_wan22_experts, write_wan_lora,  # noqa: E402
                                   write_wan_model)
from zoo import lora_pairs, peft_value, read_tensors  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ADAPTER = "prolora_out"
TINY = wan_config("wan2.1-t2v-14b:tiny")
CONFIG = {k: v for k, v in TINY.diffusers_config().items() if not k.startswith("_")}

# original Wan module -> diffusers module inside block N, written out here from the Wan code's names
# (independently of prolora's map, which the converter test checks against diffusers)
BLOCK = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
         "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
         "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
         "ffn.2": "ffn.net.2"}


def _quiet():
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()


def _perturbed(sd: dict[str, torch.Tensor], size: float, seed: int) -> dict[str, torch.Tensor]:
    """Each matrix plus a change of relative size `size` (low-rank drift + noise); others as they are."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in sd.items():
        if w.dim() == 2:
            m, n = w.shape
            drift = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)
            noise = torch.randn(m, n, generator=g)
            d = math.sqrt(0.8) * drift / drift.norm() + math.sqrt(0.2) * noise / noise.norm()
            out[k] = w + size * w.norm() * d / d.norm()
        else:
            out[k] = w.clone()
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    _quiet()
    from diffusers import WanTransformer3DModel

    d = tmp_path_factory.mktemp("wan")
    torch.manual_seed(7)
    src = WanTransformer3DModel(**CONFIG).eval()
    sd = {k: v.detach().clone().contiguous() for k, v in src.state_dict().items()}
    save(d / "wan2.1_t2v_14B.safetensors", {"model.diffusion_model." + diffusers_to_original(k): v
                                            for k, v in sd.items()})
    pipe = d / "wan2.2"
    for comp, size, seed in (("transformer", 0.08, 1), ("transformer_2", 0.05, 2)):
        t = WanTransformer3DModel(**CONFIG).eval()
        t.load_state_dict(_perturbed(sd, size, seed), strict=True)
        t.save_pretrained(pipe / comp, max_shard_size="100KB")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}))
    return {"dir": d, "source": d / "wan2.1_t2v_14B.safetensors", "target": pipe}


@pytest.fixture(scope="module")
def loras(models):
    d, src = models["dir"], models["source"]
    out = {f: write_wan_lora(src, d / f"{f}.safetensors", f, rank=4, seed=i)
           for i, f in enumerate(("peft", "kohya", "comfy"))}
    # DiffSynth-Studio / some ComfyUI savers: the same names with lora_A / lora_B
    tensors, meta = read_tensors(out["comfy"])
    save(d / "comfy_ab.safetensors", {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
                                      for k, v in tensors.items()}, meta)
    out["comfy_ab"] = d / "comfy_ab.safetensors"
    # a model-level diffusers file (save_lora_adapter): no `transformer.` prefix; written back with it
    tensors, meta = read_tensors(out["peft"])
    save(d / "peft_bare.safetensors", {k.removeprefix("transformer."): v for k, v in tensors.items()},
         {"lora_adapter_metadata": json.dumps({k.removeprefix("transformer."): v for k, v in
                                               json.loads(meta["lora_adapter_metadata"]).items()})})
    out["peft_bare"] = d / "peft_bare.safetensors"
    return out


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("preset", ["wan2.1-t2v-14b:tiny", "wan2.2-ti2v-5b:tiny", "wan2.1-i2v-14b:tiny"])
def test_synthetic_params_are_diffusers_own(preset):
    """Names and shapes of every parameter, against WanTransformer3DModel itself."""
    cfg = wan_config(preset)
    model = diffusers.WanTransformer3DModel(**{k: v for k, v in cfg.diffusers_config().items()
                                               if not k.startswith("_")})
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == wan_params(cfg)


@pytest.mark.parametrize("preset", ["wan2.1-t2v-14b:tiny", "wan2.1-i2v-14b:tiny"])
def test_original_names_are_diffusers_converters(preset):
    """Our original-name map is the inverse of diffusers' single-file converter, for every parameter
    (I2V: k_img / v_img / norm_k_img and img_emb too)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    names = [n for n, _ in wan_params(wan_config(preset))]
    fake = {"model.diffusion_model." + diffusers_to_original(n): torch.zeros(1) for n in names}
    assert sorted(convert_wan_transformer_to_diffusers(fake)) == sorted(names)


def test_readers_and_families(models, tmp_path):
    src = open_model(models["source"])
    assert (src.family, src.layout, src.facts["blocks"], src.facts["hidden"]) == ("wan", "single-file", 3, 32)
    assert src.resolve("lora_unet_blocks_1_self_attn_q") == ("transformer.blocks.1.attn1.to_q", "kohya-ldm")
    assert src.resolve("diffusion_model.blocks.2.ffn.0") == ("transformer.blocks.2.ffn.net.0.proj", "comfy")
    pipe = open_model(models["target"])  # sharded experts
    assert pipe.facts["experts"] == {"high_noise": "transformer", "low_noise": "transformer_2"}
    assert {m.partition(".")[0] for m in pipe.weights} == {"transformer", "transformer_2"}
    assert open_model(models["target"] / "transformer_2").family == "wan"
    ti2v = open_model(write_wan_model(tmp_path / "ti2v", "wan2.2-ti2v-5b:tiny"))
    assert (ti2v.family, ti2v.facts["in_channels"], ti2v.facts["variant"]) == ("wan-ti2v", 48, "TI2V")
    bare = open_model(write_wan_model(tmp_path / "bare.safetensors", layout="single-file"))
    assert bare.family == "wan" and set(bare.weights) == set(src.weights)
    # a single file with diffusers' own names (as diffusers-format single files are shared)
    tensors, _ = read_tensors(next((models["target"] / "transformer").glob("*.safetensors")))
    for shard in sorted((models["target"] / "transformer").glob("*.safetensors"))[1:]:
        tensors.update(read_tensors(shard)[0])
    save(tmp_path / "diffusers_keys.safetensors", tensors)
    named = open_model(tmp_path / "diffusers_keys.safetensors")
    assert named.family == "wan" and set(named.weights) == set(src.weights)
    assert named.original == src.original  # kohya / ComfyUI spellings available all the same
    synth = write_wan22_experts(tmp_path / "wan22", base=models["source"], shard_bytes=20000)
    both = open_model(synth["pipeline"])
    assert both.experts == {"high_noise": "transformer", "low_noise": "transformer_2"}
    assert len(list((synth["low_noise"]).glob("*.safetensors"))) > 1  # sharded, with an index
    assert json.loads((synth["pipeline"] / "model_index.json").read_text())["boundary_ratio"] == 0.875
    facts = inspect(models["target"])
    assert facts["kind"] == "model" and facts["family"] == "wan" and set(facts["components"]) == {
        "transformer", "transformer_2"}
    sim = similarity(models["source"], models["target"] / "transformer_2", cache=False)
    assert len(sim.report.layers) == len(src.weights)
    assert min(r.phi_left for r in sim.report.layers) > 0.8


# ----------------------------------------------------------------------------- the client check


def output_deltas(path: Path) -> dict[str, torch.Tensor]:
    """{diffusers module: dW (float64)} of an output file, from its tensors, alphas or
    lora_adapter_metadata, and this file's own key table."""
    tensors, meta = read_tensors(path)
    cfg = {k.partition(".")[2]: v for k, v in json.loads(meta.get("lora_adapter_metadata", "{}")).items()}
    out = {}
    for stem, down, up in lora_pairs(tensors):
        if stem.startswith("transformer."):
            name = stem[len("transformer."):]
            r = peft_value(cfg, "r", "rank_pattern", name)
            out[name] = peft_value(cfg, "lora_alpha", "alpha_pattern", name) / r * (up @ down)
            continue
        alpha = tensors.get(stem + ".alpha")
        dw = (1.0 if alpha is None else float(alpha) / down.shape[0]) * (up @ down)
        m = re.match(r"^(?:lora_unet_|diffusion_model\.)blocks[._](\d+)[._](.+)$", stem)
        assert m, stem
        orig = next(k for k in BLOCK if k == m.group(2) or k.replace(".", "_") == m.group(2))
        out[f"blocks.{m.group(1)}.{BLOCK[orig]}"] = dw
    return out


def load_and_fuse(target: Path, path: Path, expert: str) -> dict:
    """Load `path` into `expert` of a WanPipeline with diffusers' loader, fuse it, compare."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    experts = {c: WanTransformer3DModel.from_pretrained(target / c, local_files_only=True)
               for c in ("transformer", "transformer_2")}
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=experts["transformer"], transformer_2=experts["transformer_2"], boundary_ratio=0.875)
    model = experts[expert]
    other = experts["transformer_2" if expert == "transformer" else "transformer"]
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    other_before = {k: v.detach().clone() for k, v in other.state_dict().items()}
    deltas = output_deltas(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER, load_into_transformer_2=expert == "transformer_2")
    adapted = {name: layer for name, layer in model.named_modules()
               if hasattr(layer, "lora_A") and ADAPTER in layer.lora_A}
    assert set(adapted) == set(deltas), (sorted(set(adapted) ^ set(deltas))[:5])
    live = {}
    for module, layer in adapted.items():
        a, b = layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach()
        live[module] = layer.scaling[ADAPTER] * (b.double() @ a.double())
        err = float((live[module] - deltas[module]).norm() / max(float(deltas[module].norm()), 1e-30))
        assert err < 1e-6, (module, err)  # alpha/rank = 1/2 here: diffusers' folding is exact
    pipe.fuse_lora(components=[expert], lora_scale=1.0)
    pipe.unload_lora_weights()
    after = model.state_dict()
    worst = 0.0
    for k, w0 in before.items():
        module = k[: -len(".weight")] if k.endswith(".weight") else None
        if module in adapted:
            err = float((after[k].double() - (w0.double() + live[module])).norm()
                        / max(float(live[module].norm()), float(w0.double().norm()) * 1e-3))
            worst = max(worst, err)
        else:
            assert torch.equal(after[k], w0), k
    for k, w0 in other_before.items():  # the other expert is untouched
        assert torch.equal(other.state_dict()[k], w0), k
    return {"adapted": set(adapted), "worst": worst}


@pytest.mark.parametrize("fmt", ["peft", "kohya", "comfy", "comfy_ab", "peft_bare"])
def test_one_lora_in_one_output_per_expert_each_loads_into_its_expert(models, loras, fmt, tmp_path):
    out = tmp_path / f"{fmt}.safetensors"
    report = tmp_path / "report.json"
    res = transfer_files(models["source"], models["target"], [loras[fmt]], out, TransferOptions(cache=False),
                         report=report)
    assert list(res.results) == ["high_noise", "low_noise"]
    files = {label: r.output for label, r in res.results.items()}
    assert files == {"high_noise": tmp_path / f"{fmt}.high_noise.safetensors",
                     "low_noise": tmp_path / f"{fmt}.low_noise.safetensors"}
    sections = json.loads(report.read_text())["experts"]
    assert set(sections) == {"high_noise", "low_noise"}
    n_in = len(prolora.formats.read_lora(loras[fmt]).modules)
    for label, comp in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
        r = res.results[label]
        assert sections[label]["target"].endswith(comp)
        assert r.report.info["target"] == comp
        s = r.report.summary()
        assert s["transferred"] + s["skipped"] == n_in, s
        got = load_and_fuse(models["target"], files[label], comp)
        assert len(got["adapted"]) == s["transferred"]
        assert got["worst"] < 1e-5, got["worst"]
    # the two experts differ, so their outputs do
    a, _ = read_tensors(files["high_noise"])
    b, _ = read_tensors(files["low_noise"])
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)


def test_two_targets_as_comfyui_split_files(models, loras, tmp_path, capsys):
    split = write_wan22_experts(tmp_path / "split", base=models["source"], layout="single-file-prefixed")
    assert open_model(split["high_noise"]).family == "wan"
    out = tmp_path / "style.safetensors"
    code = main(["transfer", str(models["source"]), str(split["high_noise"]), str(loras["kohya"]), "-o", str(out),
                 "--target-2", str(split["low_noise"]), "--no-cache", "-q"])
    assert code == 0
    text = capsys.readouterr().out
    assert "== high-noise expert" in text and "== low-noise expert" in text
    assert (tmp_path / "style.high_noise.safetensors").is_file() and (tmp_path / "style.low_noise.safetensors").is_file()
    with pytest.raises(OptionError, match="named as the low-noise expert"):
        transfer_files(models["source"], split["low_noise"], [loras["kohya"]], tmp_path / "x.safetensors",
                       TransferOptions(cache=False), target_2=split["high_noise"])


def test_dropped_modules_are_named_and_absent_from_the_output(models, loras, tmp_path):
    """A target with fewer blocks: the LoRA's modules on the missing block are dropped, named."""
    shallow = tmp_path / "shallow"
    write_wan_model(shallow, replace(TINY, num_layers=2))
    out = tmp_path / "o.safetensors"
    res = transfer(models["source"], shallow, loras["comfy"], out, cache=False, tau=0.0)
    dropped = [r for r in res.report.layers if not r.transferred]
    assert dropped and all(".blocks.2." in r.module and "has 2 blocks" in r.reason for r in dropped)
    assert not any(k.startswith("diffusion_model.blocks.2.") for k in read_tensors(out)[0])


def test_ti2v_target_is_refused_with_the_reason(models, loras, tmp_path, capsys):
    ti2v = write_wan_model(tmp_path / "ti2v", "wan2.2-ti2v-5b:tiny")
    with pytest.raises(ModelError, match="different widths"):
        transfer(models["source"], ti2v, loras["peft"], tmp_path / "o.safetensors", cache=False)
    code = main(["transfer", str(models["source"]), str(ti2v), str(loras["peft"]), "-o",
                 str(tmp_path / "o.safetensors"), "--no-cache", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "TI2V-5B" in err and "--widths lstsq" in err
    assert not (tmp_path / "o.safetensors").exists()
    # --widths lstsq lets it through; each layer is then mapped or refused by its own phi
    res = transfer(models["source"], ti2v, loras["peft"], None, cache=False, widths="lstsq", tau=0.0)
    mapped = [r.module for r in res.report.layers if r.transferred]
    assert mapped and all("least-squares" in r.reason for r in res.report.layers if r.transferred)
    assert {r.module for r in res.report.layers if not r.transferred} == {
        m for m in (r.module for r in res.report.layers) if ".blocks.2." in m}  # TI2V tiny has 2 blocks
    assert set(res.lora.modules) == {f"transformer.{m.partition('.')[2]}" for m in mapped}


def test_a_two_expert_folder_is_no_single_source(models, loras, tmp_path):
    with pytest.raises(ModelError, match="holds both Wan 2.2 experts"):
        transfer(models["target"], models["source"], loras["peft"], tmp_path / "o.safetensors", cache=False)


def test_musubi_output_with_gaps_is_padded_so_diffusers_loads_it(models, loras, tmp_path):
    """diffusers' musubi converter needs every attention/ffn module of blocks 0..n-1: a kohya LoRA
    without block 0 and without one module of block 1 comes out with zero-delta modules there."""
    lf = prolora.formats.read_lora(loras["kohya"])
    keep = {k: m for k, m in lf.modules.items()
            if not k.startswith("lora_unet_blocks_0_") and k != "lora_unet_blocks_1_self_attn_q"}
    gappy = tmp_path / "gappy.safetensors"
    prolora.formats.write_lora(gappy, prolora.lora.LoraFile(lf.format, keep, dict(lf.metadata)))
    out = tmp_path / "o.safetensors"
    res = transfer(models["source"], models["target"] / "transformer", gappy, out, cache=False)
    assert any("zero-delta" in w for w in res.report.warnings)
    tensors, _ = read_tensors(out)
    assert not tensors["lora_unet_blocks_0_self_attn_q.lora_up.weight"].any()
    assert not tensors["lora_unet_blocks_1_self_attn_q.lora_up.weight"].any()
    got = load_and_fuse(models["target"], out, "transformer")
    assert len(got["adapted"]) == 30 and got["worst"] < 1e-5


@pytest.mark.parametrize("preset, family, variant, blocks, hidden", [
    ("wan2.1-t2v-14b", "wan", "T2V-14B", 40, 5120), ("wan2.1-t2v-1.3b", "wan", "T2V-1.3B", 30, 1536),
    ("wan2.2-ti2v-5b", "wan-ti2v", "TI2V-5B", 30, 3072)])
def test_full_size_layouts_are_told_apart(preset, family, variant, blocks, hidden):
    """Family and variant from the published full-size shapes (parameter list only, no weights)."""
    from prolora.families.wan.read import _family, _structure

    shapes = dict(wan_params(wan_config(preset)))
    facts = _structure(shapes, shapes["patch_embedding.weight"])
    assert (_family(facts), facts["variant"], facts["blocks"], facts["hidden"]) == (family, variant, blocks, hidden)


def test_similarity_against_a_two_expert_folder_gives_one_table_per_expert(models, tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["similarity", str(models["source"]), str(models["target"]), "--json", str(out), "--no-cache"]) == 0
    text = capsys.readouterr().out
    assert "== high-noise expert" in text and "== low-noise expert" in text
    sections = json.loads(out.read_text())["experts"]
    n = len(open_model(models["source"]).weights)
    for label, comp in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
        assert sections[label]["target"].endswith(comp) and len(sections[label]["layers"]) == n
    # the low-noise expert is the smaller change (0.05 vs 0.08 of each weight), so it is the closer one
    mean = {label: sections[label]["summary"]["mean_phi_left"] for label in sections}
    assert mean["low_noise"] > mean["high_noise"]


def test_a_batch_onto_two_experts(models, loras, tmp_path, capsys):
    """Several LoRAs: `<OUT>/<stem>.<expert>.safetensors` each; one that fails is reported, the others written."""
    wrong = write_wan_lora(write_wan_model(tmp_path / "ti2v", "wan2.2-ti2v-5b:tiny"), tmp_path / "wrong.safetensors")
    out = tmp_path / "out"
    code = main(["transfer", str(models["source"]), str(models["target"]), str(loras["peft"]), str(loras["comfy"]),
                 str(wrong), "-o", str(out), "--report", str(tmp_path / "r.json"), "--no-cache", "-q"])
    assert code == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.{e}.safetensors" for n in ("peft", "comfy")
                                                           for e in ("high_noise", "low_noise"))
    sections = json.loads((tmp_path / "r.json").read_text())["experts"]
    for label in ("high_noise", "low_noise"):
        assert len(sections[label]["results"]) == 2
        assert [f["lora"] for f in sections[label]["failures"]] == [str(wrong)]
    for label, comp in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
        got = load_and_fuse(models["target"], out / f"comfy.{label}.safetensors", comp)
        assert got["worst"] < 1e-5


def test_unprefixed_peft_file_transfers_like_the_prefixed_one(models, loras, tmp_path):
    """Same modules, same alpha (from the unprefixed lora_adapter_metadata): the same output."""
    outs = [transfer(models["source"], models["target"] / "transformer", loras[f], tmp_path / f"{f}.safetensors",
                     cache=False).output for f in ("peft", "peft_bare")]
    a, meta_a = read_tensors(outs[0])
    b, meta_b = read_tensors(outs[1])
    assert set(a) == set(b) and all(k.startswith("transformer.") for k in b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(meta_a["lora_adapter_metadata"]) == json.loads(meta_b["lora_adapter_metadata"])


def test_wan21_i2v_lora_on_a_wan22_i2v_expert_drops_the_image_cross_attention(tmp_path):
    """Wan 2.2's I2V experts have no CLIP image branch: a 2.1 I2V LoRA's k_img / v_img modules are
    dropped, each named with the reason, and the musubi output holds no key for them."""
    i2v = wan_config("wan2.1-i2v-14b:tiny")
    src = write_wan_model(tmp_path / "i2v21.safetensors", i2v, layout="single-file-prefixed")
    tgt = write_wan_model(tmp_path / "i2v22", replace(i2v, image_dim=None, added_kv_proj_dim=None), base=src)
    assert open_model(src).facts["variant"] == "I2V" and open_model(tgt).facts["image_cross_attention"] is False
    lora = write_wan_lora(src, tmp_path / "i2v.safetensors", "kohya")
    assert any("k_img" in k for k in read_tensors(lora)[0])
    res = transfer(src, tgt, lora, tmp_path / "o.safetensors", cache=False)
    dropped = [r for r in res.report.layers if not r.transferred]
    assert sorted(r.module for r in dropped) == sorted(f"transformer.blocks.{i}.attn2.add_{x}_proj"
                                                       for i in range(3) for x in "kv")
    assert all("no image cross-attention" in r.reason for r in dropped)
    assert not any("_img" in k for k in read_tensors(tmp_path / "o.safetensors")[0])


def test_expert_output_names(models, loras, tmp_path):
    from prolora.errors import OutputPathError
    from prolora.experts import expert_outputs, experts_of

    assert expert_outputs(tmp_path / "a.safetensors", "x/style.safetensors", ["high_noise", "low_noise"]) == {
        "high_noise": tmp_path / "a.high_noise.safetensors", "low_noise": tmp_path / "a.low_noise.safetensors"}
    assert expert_outputs(tmp_path, "x/style.safetensors", ["low_noise"]) == {
        "low_noise": tmp_path / "style.low_noise.safetensors"}
    with pytest.raises(OutputPathError):
        expert_outputs(tmp_path / "missing", "style.safetensors", ["high_noise"])
    with pytest.raises(OptionError, match="already"):
        experts_of(models["target"], models["source"])
    assert experts_of(models["target"] / "transformer") is None and experts_of(models["source"]) is None
    # an existing output is refused before any work, for either expert
    (tmp_path / "b.low_noise.safetensors").write_bytes(b"")
    with pytest.raises(OutputPathError, match="already exists"):
        transfer_files(models["source"], models["target"], [loras["peft"]], tmp_path / "b.safetensors",
                       TransferOptions(cache=False))
    assert not (tmp_path / "b.high_noise.safetensors").exists()
