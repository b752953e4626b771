"""SDXL -> Vega / KOALA, the pruned SDXL kin people migrate LoRAs to (families/sd/, matching.py).

Tiny diffusers UNet2DConditionModel configs with the real block structure and small widths:
- SDXL: transformer depth per input block [0,0,2,2,10,10], mid block 10 deep (diffusers
  `transformer_layers_per_block=[1, 2, 10]`, two resnets per level).
- Vega: [0,0,1,1,2,2], decoder mirrored ([2,2,2], [1,1,1]), a middle block without attention
  (diffusers `UNetMidBlock2D`, as SSD-1B).
- KOALA-700M: [0,2,5], KOALA-1B: [0,2,6]: one resnet + attention per encoder level (diffusers
  `layers_per_block=1`, so two per decoder level) with the decoder mirroring the encoder's
  depths; KOALA-700M has no middle block (`mid_block_type=None`), KOALA-1B keeps one as deep as
  its deepest level. The encoder depths are ComfyUI's (supported_models); the decoder depths and
  the middle blocks are our reading of the KOALA paper, not checked against the published
  config.json.
Each target's transformer blocks are a known subset of the source's blocks (plus a small change),
so similarity matching has a truth to recover. Every module of an SDXL LoRA (every linear and
conv of the UNet) must land on a real target layer or be named as dropped in the report; the
output holds only keys of the target, and diffusers' own SDXL LoRA loader attaches every one of
them to the target UNet, whose merged weights equal base + our dW.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from zoo import SDXL_UNET  # noqa: E402

import prolora  # noqa: E402
from prolora.families import open_model  # noqa: E402
from prolora.synthetic import write_lora  # noqa: E402

# the unexpected-keys checks read diffusers' warnings: on here, whatever an earlier module left
pytestmark = pytest.mark.usefixtures("one_thread", "diffusers_warnings")
ADAPTER = "prolora_out"

SDXL_REAL = dict(SDXL_UNET, transformer_layers_per_block=[1, 2, 10])
VEGA = dict(SDXL_UNET, transformer_layers_per_block=[1, 1, 2], mid_block_type="UNetMidBlock2D")
KOALA_700M = dict(SDXL_UNET, layers_per_block=1, transformer_layers_per_block=[1, 2, 5], mid_block_type=None)
KOALA_1B = dict(SDXL_UNET, layers_per_block=1, transformer_layers_per_block=[1, 2, 6])
KIN = {"vega": VEGA, "koala-700m": KOALA_700M, "koala-1b": KOALA_1B}
FAMILY = {"vega": "vega", "koala-700m": "koala", "koala-1b": "koala"}
BLOCK = re.compile(r"^(.*attentions\.\d+)\.transformer_blocks\.(\d+)\.(.*)$")


def _depths(state: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in state:
        m = BLOCK.match(name)
        if m:
            out[m[1]] = max(out.get(m[1], 0), int(m[2]) + 1)
    return out


@pytest.fixture(scope="module")
def kin(tmp_path_factory):
    """The SDXL source and each pruned target as diffusers UNet folders, the truth of which source
    block each target block was made from, and an SDXL LoRA on every linear and conv (kohya, LDM
    names as kohya's SDXL scripts write them)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("kin")
    torch.manual_seed(0)
    src = UNet2DConditionModel(**SDXL_REAL)
    s_state = src.state_dict()
    src.save_pretrained(root / "sdxl")
    s_depth = _depths(s_state)
    out = {"dir": root, "source": root / "sdxl", "targets": {}, "truth": {}}
    g = torch.Generator().manual_seed(1)
    for name, cfg in KIN.items():
        tgt = UNet2DConditionModel(**cfg)
        t_state = tgt.state_dict()
        # (canonical attention, target block) -> source block: a sorted random subset, as pruning keeps order
        truth = {}
        for attn, n in _depths(t_state).items():
            if attn in s_depth and s_depth[attn] != n:
                keep = sorted(torch.randperm(s_depth[attn], generator=g)[:n].tolist())
                truth.update({(f"unet.{attn}", j): keep[j] for j in range(n)})
        new = {}
        for key, w in t_state.items():
            m = BLOCK.match(key)
            skey = key
            if m and (f"unet.{m[1]}", int(m[2])) in truth:
                skey = f"{m[1]}.transformer_blocks.{truth[(f'unet.{m[1]}', int(m[2]))]}.{m[3]}"
            base = s_state.get(skey)
            if base is None or base.shape != w.shape:  # a layer of KOALA's own (another width or place)
                new[key] = w
                continue
            noise = torch.randn(base.shape, generator=g) * 0.03 * base.std() if base.numel() > 1 else 0
            new[key] = base + noise
        tgt.load_state_dict(new)
        tgt.save_pretrained(root / name)
        out["targets"][name] = root / name
        out["truth"][name] = truth
    out["lora"] = write_lora(out["source"], root / "sdxl_all.safetensors", format="kohya", rank=4,
                             targets="all", conv=True)
    return out


@pytest.fixture(scope="module")
def kin_results(kin):
    """One `--match auto` transfer per target (kohya in, kohya out), shared by the tests."""
    res = {}
    for name, target in kin["targets"].items():
        res[name] = prolora.transfer(kin["source"], target, kin["lora"], kin["dir"] / f"out_{name}.safetensors",
                                     tau=0.0, match="auto")
    return res


def test_family_detection_of_sdxl_kin(kin):
    with open_model(kin["source"]) as m:
        assert m.family == "sdxl"
    for name, target in kin["targets"].items():
        with open_model(target) as m:
            assert m.family == FAMILY[name], name
            assert m.kohya_spelling == "kohya-ldm"


@pytest.mark.parametrize("name", list(KIN))
def test_match_auto_gives_every_target_block_its_source_block(kin, kin_results, name):
    res = kin_results[name]
    found = {(m["attention"], m["target_block"]): m["source_block"] for m in res.report.info["matching"]}
    assert found == kin["truth"][name]  # every target block of a pruned attention, and the right one
    assert all(m["score"] > 0.9 for m in res.report.info["matching"])
    # attentions of the same depth keep their names; none of the target's lacks a source counterpart
    with open_model(kin["targets"][name]) as t:
        t_blocks = {(a, int(b)) for a, b in (re.match(r"^(unet\..*attentions\.\d+)\.transformer_blocks\.(\d+)\.",
                                                      k).groups() for k in t.weights if ".transformer_blocks." in k)}
    with open_model(kin["source"]) as s:
        s_attn = {k.split(".transformer_blocks.")[0] for k in s.weights if ".transformer_blocks." in k}
    assert all(a in s_attn for a, _ in t_blocks)
    assert {b for b in t_blocks if b not in found} == {b for b in t_blocks if b[0] not in {a for a, _ in found}}


@pytest.mark.parametrize("name", list(KIN))
def test_every_lora_module_lands_or_is_named_as_dropped(kin, kin_results, name):
    from prolora.formats import read_lora

    res = kin_results[name]
    lora = read_lora(kin["lora"])
    rows = {r.source_key: r for r in res.report.layers}
    assert set(rows) == set(lora.modules)  # none silently lost
    dropped = [r for r in rows.values() if not r.transferred]
    assert dropped and all(r.reason for r in dropped)
    reasons = {r.reason.split(":")[0] for r in dropped}
    assert "block removed in the target (similarity matching)" in reasons
    if name.startswith("koala"):  # encoder resnets and attentions KOALA removed; decoder layers of another width
        assert "no counterpart in the target model" in reasons
        assert any(r.reason.startswith("target weight has shape") for r in dropped)
    out = read_lora(res.output)
    assert len(out.modules) == sum(r.transferred for r in rows.values())
    with open_model(kin["targets"][name]) as t:
        for key in out.modules:  # every output key names a real layer of the target
            hit = t.resolve(key)
            assert hit is not None and hit[0] in t.weights, key
    for r in rows.values():
        if r.transferred:
            assert r.target_key in out.modules


def _file_deltas(path: Path, target: Path) -> dict[str, torch.Tensor]:
    """{canonical module: dW} from the output file alone (kohya: alpha / rank * up @ down)."""
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    with open_model(target) as tm:
        for key in t:
            if key.endswith(".lora_down.weight"):
                stem = key[: -len(".lora_down.weight")]
                down, up = t[key].double(), t[stem + ".lora_up.weight"].double()
                alpha = t.get(stem + ".alpha")
                scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
                module = tm.resolve(stem)[0]
                out[module] = (scale * (up.flatten(1) @ down.flatten(1))).reshape(tm.weights[module].shape)
    return out


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
@pytest.mark.parametrize("name", list(KIN))
def test_diffusers_loads_the_kin_output_into_the_target_unet(kin, kin_results, name, fmt, tmp_path, caplog):
    """diffusers' StableDiffusionXLPipeline.load_lora_weights (kohya SGM names mapped to diffusers
    through the target's own config; PEFT as written) attaches every module of the output to the
    target UNet, warns of no unexpected key, and the merged weights equal base + dW computed from
    the file."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from client_sd import output_deltas

    target = kin["targets"][name]
    if fmt == "kohya":
        path = kin_results[name].output
    else:
        path = prolora.transfer(kin["source"], target, kin["lora"], tmp_path / "peft.safetensors", tau=0.0,
                                format="peft").output
    unet = UNet2DConditionModel.from_pretrained(target, local_files_only=True)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler(),
                                     add_watermarker=False)
    before = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    deltas = _file_deltas(path, target) if fmt == "kohya" else output_deltas(path, target, {"unet": unet})
    assert deltas
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage()]
    adapted = {f"unet.{n}": layer for n, layer in unet.named_modules()
               if hasattr(layer, "lora_A") and ADAPTER in layer.lora_A}
    assert set(adapted) == set(deltas)  # nothing ignored, nothing we did not write
    for module, layer in adapted.items():
        layer.merge(adapter_names=[ADAPTER])
        w1 = layer.get_base_layer().weight.detach().double()
        w0 = before[module[len("unet."):] + ".weight"].double()
        dw = deltas[module]
        assert float((w1 - (w0 + dw)).norm() / dw.norm()) < 1e-5, module


@pytest.mark.parametrize("name", ["vega", "koala-700m"])
def test_kin_single_file_targets(kin, kin_results, name, tmp_path):
    """The same targets as SGM single files (UNet only, `model.diffusion_model.` keys laid out for
    their own block structure): the same family, and the transfer adapts the same target layers."""
    from diffusers import UNet2DConditionModel
    from zoo import write_single_file

    unet = UNet2DConditionModel.from_pretrained(kin["targets"][name], local_files_only=True)
    single = write_single_file({"unet": unet.state_dict()}, tmp_path / f"{name}.safetensors", components=("unet",))
    with open_model(single) as m:
        assert m.family == FAMILY[name] and m.layout == "single-file"
    res = prolora.transfer(kin["source"], single, kin["lora"], tmp_path / "out.safetensors", tau=0.0)
    done = lambda r: {(x.source_key, x.transferred, x.reason) for x in r.report.layers}  # noqa: E731
    assert done(res) == done(kin_results[name])
    pairs = lambda r: {(m["attention"], m["target_block"], m["source_block"])  # noqa: E731
                       for m in r.report.info["matching"]}
    assert pairs(res) == pairs(kin_results[name])


def test_kin_transfer_from_the_cli(kin, tmp_path):
    """`prolora transfer --match auto` on SDXL -> KOALA-700M, with a report naming the dropped modules."""
    from prolora.cli import main

    out, report = tmp_path / "cli_out.safetensors", tmp_path / "report.json"
    rc = main(["transfer", str(kin["source"]), str(kin["targets"]["koala-700m"]), str(kin["lora"]),
               "-o", str(out), "--match", "auto", "--tau", "0", "--report", str(report), "-q"])
    assert rc == 0 and out.exists()
    rep = json.loads(report.read_text())
    text = json.dumps(rep)
    assert "no counterpart in the target model" in text and "block removed in the target" in text
