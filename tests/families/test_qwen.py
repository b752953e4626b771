"""Qwen-Image <-> Qwen-Image-Edit (issue 15): readers, LoRA formats, transfer and diffusers as the client.

A tiny REAL diffusers QwenImageTransformer2DModel (the real layout: dual-stream blocks, separate
q/k/v, img/txt MLPs and modulation; 2 blocks at width 32) is the Qwen-Image SOURCE, saved by
diffusers as a sharded pipeline folder and as ComfyUI-style single files (bare diffusers names, and
under `model.diffusion_model.`). The Qwen-Image-Edit TARGET is the same class with the source's
weights plus a fine-tune-like change (Edit shares the layout; only its pipeline class differs),
small everywhere except block 1's image stream, which changes a lot: the report must show that the
two models agree everywhere but there.

LoRAs are written as the trainers write them (keys from families/qwen_image/model.py's module doc and
diffusers' _convert_non_diffusers_qwen_lora_to_diffusers): musubi-tuner kohya `lora_unet_...` with
alpha, diffusers PEFT `transformer....lora_A/B` with lora_adapter_metadata, ComfyUI
`diffusion_model....lora_down/up`, ai-toolkit `diffusion_model....lora_A/B`, PEFT keys without a
prefix, and DiffSynth-Studio's `<module>.lora_A.default.weight`. The output is loaded with
diffusers' QwenImageEditPipeline.load_lora_weights (QwenImageLoraLoaderMixin) into the target
transformer; its dW is computed here from the output file alone, and the fused weights must equal
target + dW.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402

import prolora  # noqa: E402
from prolora.families import open_model  # noqa: E402
from prolora.errors import ModelError  # noqa: E402
from prolora.formats import read_lora  # noqa: E402
from prolora.lora import LoraModule  # noqa: E402
from prolora.safetensors_io import save  # noqa: E402
from prolora.families.qwen_image.synthetic import qwen_config, qwen_params, write_qwen_lora, write_qwen_model  # noqa: E402
from client_flux import perturbed  # noqa: E402
from zoo import lora_pairs, peft_value  # noqa: E402

# the unexpected-keys checks read diffusers' warnings: on here, whatever an earlier module left
pytestmark = pytest.mark.usefixtures("one_thread", "diffusers_warnings")
ADAPTER = "prolora_out"
CFG = qwen_config("tiny")  # 2 blocks, 2 heads of 16 = width 32, MLP 128, joint 24
H = CFG.hidden
# block 1's image stream: what the Edit target changes a lot
HEAVY = tuple(f"transformer_blocks.1.{m}" for m in ("img_mod.1", "attn.to_q", "attn.to_k", "attn.to_v",
                                                      "attn.to_out.0", "img_mlp.net.0.proj", "img_mlp.net.2"))
# (input format, spelling) -> the input LoRA; "kohya" also carries text-encoder modules as a
# trainer that adapted Qwen2.5-VL would write them (lora_te_ + transformers' names)
FORMATS = {"kohya": ("kohya", None, False), "peft": ("peft", None, False), "peft-bare": ("peft", "peft-bare", False),
           "comfy": ("comfy", None, False), "ai-toolkit": ("comfy", None, True)}
# DiffSynth-Studio: unprefixed keys with peft's in-model `.lora_A.default.weight`, no metadata (made
# from the peft-bare file in the fixture)
ALL_FORMATS = [*FORMATS, "diffsynth"]
TE_KEYS = ("lora_te_model_layers_0_self_attn_q_proj", "lora_te_model_layers_0_mlp_down_proj")


def _pipeline_folder(model, folder: Path, pipeline: str) -> Path:
    model.save_pretrained(folder / "transformer", max_shard_size="60KB")  # sharded, with its index
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": pipeline, "_diffusers_version": "0.35.0",
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"]}))
    return folder


def _diffsynth(peft_bare: Path, path: Path) -> Path:
    """The unprefixed PEFT file as DiffSynth-Studio saves it: `.lora_A.default.weight` keys, no
    metadata (so scale 1: the file's scale folded into B)."""
    lf = read_lora(peft_bare)
    tensors = {}
    for key, m in lf.modules.items():
        tensors[f"{key}.lora_A.default.weight"] = m.down
        tensors[f"{key}.lora_B.default.weight"] = (m.up.float() * m.scale).half()
    save(path, tensors)
    return path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(7)
    src = diffusers.QwenImageTransformer2DModel(**CFG.model_config()).eval()
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    _pipeline_folder(src, d / "qwen-image", "QwenImagePipeline")
    save(d / "qwen_image_bf16.safetensors", {k: v.to(torch.bfloat16) for k, v in sd.items()})  # ComfyUI's
    save(d / "qwen_image_prefixed.safetensors", {"model.diffusion_model." + k: v for k, v in sd.items()})
    heavy = {k: v for k, v in sd.items() if k.startswith(HEAVY)}
    light = {k: v for k, v in sd.items() if k not in heavy}
    edit = diffusers.QwenImageTransformer2DModel(**CFG.model_config()).eval()
    edit.load_state_dict({**perturbed(light, size=0.03, seed=11), **perturbed(heavy, size=0.8, seed=12)},
                         strict=True)
    esd = {k: v.detach().clone() for k, v in edit.state_dict().items()}
    _pipeline_folder(edit, d / "qwen-image-edit", "QwenImageEditPipeline")
    save(d / "qwen_image_edit.safetensors", {"model.diffusion_model." + k: v for k, v in esd.items()})
    source = d / "qwen-image"
    loras = {}
    for name, (fmt, spelling, ab) in FORMATS.items():
        extra = None
        if name == "kohya":
            g = torch.Generator().manual_seed(3)
            extra = {k: LoraModule(k, (0.1 * torch.randn(4, 24, generator=g)).half(),
                                   (0.1 * torch.randn(24, 4, generator=g)).half(), 2.0) for k in TE_KEYS}
        loras[name] = write_qwen_lora(source, d / f"{name}.safetensors", fmt, rank=4, targets="all", spelling=spelling,
                                      lora_ab=ab, seed=len(loras), extra=extra)
    loras["diffsynth"] = _diffsynth(loras["peft-bare"], d / "diffsynth.safetensors")
    return {"dir": d, "source": source, "edit": d / "qwen-image-edit", "edit_single": d / "qwen_image_edit.safetensors",
            "bare": d / "qwen_image_bf16.safetensors", "prefixed": d / "qwen_image_prefixed.safetensors",
            "loras": loras, "edit_state": esd}


# ----------------------------------------------------------------------------- our output, read independently


def _diffusers_names() -> list[str]:
    """Every linear of the tiny QwenImageTransformer2DModel, by diffusers' own module names."""
    with torch.device("meta"):
        m = diffusers.QwenImageTransformer2DModel(**CFG.model_config())
    return [n for n, layer in m.named_modules() if isinstance(layer, torch.nn.Linear)]


def file_deltas(path: Path) -> dict[str, torch.Tensor]:
    """{diffusers module: dW (float64)} of a Qwen-Image LoRA file, from its tensors, its `.alpha`
    keys or its lora_adapter_metadata, and diffusers' module names (none of prolora's maps):
    `lora_unet_` + the name with `_` for `.`, `transformer.` / `diffusion_model.` + the name, or
    the bare name. Text-encoder keys are left out."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    cfg = {}
    for k, v in json.loads(meta.get("lora_adapter_metadata", "{}")).items():
        comp, _, field = k.rpartition(".")
        cfg.setdefault(comp, {})[field] = v
    names = _diffusers_names()
    flat = {n.replace(".", "_"): n for n in names}
    out = {}
    for stem, down, up in lora_pairs(tensors):
        if stem.startswith("lora_te"):
            continue
        if stem.startswith("lora_unet_"):
            name = flat[stem[len("lora_unet_"):]]
        else:
            name = stem.removeprefix("transformer.").removeprefix("diffusion_model.")
        assert name in names, stem
        if "lora_adapter_metadata" in meta:
            comp = "transformer" if stem.startswith("transformer.") else ""
            r = peft_value(cfg[comp], "r", "rank_pattern", name)
            assert r == down.shape[0], stem
            scale = peft_value(cfg[comp], "lora_alpha", "alpha_pattern", name) / r
        else:
            alpha = tensors.get(stem + ".alpha")
            scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        out[name] = scale * (up @ down)
    return out


def load_and_fuse(target: Path, path: Path, caplog) -> dict:
    """Load `path` with the target pipeline's own class (model_index.json: QwenImageEditPipeline
    for the Edit target) and its load_lora_weights onto the target's transformer, check diffusers'
    deltas against the file's, fuse, and check every weight."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(target / "transformer", local_files_only=True)
    cls = getattr(diffusers, json.loads((target / "model_index.json").read_text())["_class_name"])
    parts = {"processor": None} if cls is diffusers.QwenImageEditPipeline else {}
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
               transformer=transformer, **parts)
    before = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    deltas = file_deltas(path)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    unexpected = [r.getMessage() for r in caplog.records if "unexpected keys" in r.getMessage()]
    adapted = {name: layer for name, layer in transformer.named_modules()
               if hasattr(layer, "lora_A") and ADAPTER in layer.lora_A}
    if not adapted:
        return {"adapted": {}, "deltas": deltas, "unexpected": unexpected}
    live = {}
    for module, layer in adapted.items():
        a, b = layer.lora_A[ADAPTER].weight.detach().double(), layer.lora_B[ADAPTER].weight.detach().double()
        live[module] = layer.scaling[ADAPTER] * (b @ a)
        # diffusers folds a kohya alpha into A and B in fp16 (rounding 2^-11); others are applied as stored
        err = float((live[module] - deltas[module]).norm() / deltas[module].norm())
        assert err < 2e-3, (module, err)
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()
    after = transformer.state_dict()
    assert set(after) == set(before)
    for k, w0 in before.items():
        module = k[: -len(".weight")] if k.endswith(".weight") else None
        if module in adapted:
            dw = live[module]
            err = float((after[k].double() - (w0.double() + dw)).norm() / dw.norm())
            assert err < 1e-5, (module, err)
        else:
            assert torch.equal(after[k], w0), k
    return {"adapted": set(adapted), "deltas": deltas, "unexpected": unexpected}


# ----------------------------------------------------------------------------- layout


def test_synthetic_params_are_diffusers_layout():
    """families.qwen_image.synthetic's parameter list is QwenImageTransformer2DModel's state dict, names, shapes
    and order, at tiny, small and full width (Qwen-Image's own config, 1 block, on the meta device)."""
    for cfg in (CFG, qwen_config("small", blocks=3), qwen_config("full", blocks=1)):
        with torch.device("meta"):
            m = diffusers.QwenImageTransformer2DModel(**cfg.model_config())
        assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == qwen_params(cfg)
    full = dict(qwen_params(qwen_config("full", blocks=1)))
    assert full["transformer_blocks.0.img_mlp.net.0.proj.weight"] == (12288, 3072)
    assert full["txt_in.weight"] == (3072, 3584)
    assert qwen_config().num_layers == 60


def test_synthetic_writer_layouts(tmp_path):
    """Every layout of write_qwen_model reads back as the same model; diffusers loads the folder
    with no missing or unexpected key and the bare single file through from_single_file; the
    values are a function of the seed (and the base for a target)."""
    from diffusers import QwenImageTransformer2DModel

    src = write_qwen_model(tmp_path / "src", CFG, dtype=torch.float32, shard_bytes=40_000)
    assert (src / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    paths = {"diffusers": src, "transformer": src / "transformer"}
    for layout in ("single-file", "single-file-prefixed"):
        paths[layout] = write_qwen_model(tmp_path / f"{layout}.safetensors", CFG, layout=layout, dtype=torch.float32)
    with open_model(src) as ref:
        modules = list(ref.weights)
        w = ref.load("transformer.transformer_blocks.1.attn.add_v_proj")
        assert ref.variant == "image" and ref.layout == "diffusers"
    for layout, path in paths.items():
        with open_model(path) as m:
            assert m.family == "qwen-image" and list(m.weights) == modules, layout
            assert torch.equal(m.load("transformer.transformer_blocks.1.attn.add_v_proj"), w), layout
    model, info = QwenImageTransformer2DModel.from_pretrained(src / "transformer", local_files_only=True,
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    single = QwenImageTransformer2DModel.from_single_file(str(paths["single-file"]), config=str(src / "transformer"),
                                                          local_files_only=True)
    assert torch.equal(single.state_dict()["transformer_blocks.1.attn.add_v_proj.weight"], w)
    again = write_qwen_model(tmp_path / "again.safetensors", CFG, layout="single-file", dtype=torch.float32)
    assert again.read_bytes() == paths["single-file"].read_bytes()
    edit = write_qwen_model(tmp_path / "edit", qwen_config("tiny", edit=True), dtype=torch.float32, base=src)
    with open_model(edit) as m:
        assert m.variant == "edit"
        assert not torch.equal(m.load("transformer.transformer_blocks.1.attn.add_v_proj"), w)
    assert json.loads((edit / "model_index.json").read_text())["_class_name"] == "QwenImageEditPipeline"


def test_detection_in_every_layout(qwen):
    from prolora.api import inspect

    cases = {qwen["source"]: ("diffusers", "image"), qwen["source"] / "transformer": ("diffusers", "unknown"),
             qwen["edit"]: ("diffusers", "edit"), qwen["bare"]: ("single-file", "unknown"),
             qwen["prefixed"]: ("single-file", "unknown"), qwen["edit_single"]: ("single-file", "unknown")}
    for path, (layout, variant) in cases.items():
        with open_model(path) as m:
            assert (m.family, m.layout, m.variant) == ("qwen-image", layout, variant), path
            assert len(m.weights) == 6 + 14 * CFG.num_layers  # every linear of the transformer, nothing else
        info = inspect(path)
        assert info["kind"] == "model" and info["family"] == "qwen-image"
        assert info["transformer_blocks"] == 2 and info["hidden"] == H and info["mlp_hidden"] == 4 * H
    with open_model(qwen["source"]) as a, open_model(qwen["prefixed"]) as b:
        assert a.weights.keys() == b.weights.keys()
        assert torch.equal(a.load("transformer.txt_in"), b.load("transformer.txt_in"))
    for name, path in qwen["loras"].items():
        assert inspect(path)["family"] == "qwen-image", name


def test_other_qwen_layouts_are_refused(tmp_path):
    """A Qwen-Image-2.1 transformer (another architecture) and a file with Qwen-Image block keys
    but no embedders are refused with one line each; the CLI exits 2."""
    from prolora.cli import main

    v21 = tmp_path / "qwen_image_2.1.safetensors"
    save(v21, {"txt_in.text_norm.weight": torch.zeros(8),
               "transformer_blocks.0.img_mlp.gate_up.weight": torch.zeros(8, 4)})
    with pytest.raises(ModelError, match="Qwen-Image-2.1"):
        open_model(v21)
    part = tmp_path / "partial.safetensors"
    save(part, {"txt_norm.weight": torch.zeros(8), "transformer_blocks.0.img_mod.1.weight": torch.zeros(24, 4)})
    with pytest.raises(ModelError, match="not a whole Qwen-Image transformer"):
        open_model(part)
    assert main(["inspect", str(v21)]) == 2


# ----------------------------------------------------------------------------- formats: read, transfer, write back


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_each_format_round_trips_on_an_identical_target(qwen, name, tmp_path):
    """Onto a target with the source's very weights (the prefixed single file) every module
    transfers with phi = 1 and its dW unchanged; the output keeps the input's format and key
    spelling (unprefixed PEFT keys come back under `transformer.`, which every Qwen-Image loader
    reads), and text-encoder modules are named as dropped."""
    lora = qwen["loras"][name]
    out = tmp_path / "out.safetensors"
    res = prolora.transfer(qwen["source"], qwen["prefixed"], lora, out, cache=False)
    lin, lout = read_lora(lora), read_lora(out)
    assert lout.format == lin.format
    te = {k for k in lin.modules if k.startswith("lora_te")}
    bare = name in ("peft-bare", "diffsynth")
    assert set(lout.modules) == {("transformer." + k if bare else k) for k in set(lin.modules) - te}
    rows = {r.source_key: r for r in res.report.layers}
    assert set(rows) == set(lin.modules)
    for k in te:
        assert not rows[k].transferred and "text-encoder (Qwen2.5-VL)" in rows[k].reason
    assert all(r.transferred and r.phi_left > 0.999 for k, r in rows.items() if k not in te)
    want, got = file_deltas(lora), file_deltas(out)
    assert set(got) == set(want) and len(got) == 6 + 14 * CFG.num_layers
    for module, dw in want.items():
        assert float((got[module] - dw).norm() / dw.norm()) < 2e-3, module
    with safe_open(str(out), framework="pt") as f:
        keys = list(f.keys())
    prefix = {"kohya": "lora_unet_", "comfy": "diffusion_model.", "ai-toolkit": "diffusion_model."}.get(
        name, "transformer.")
    assert all(k.startswith(prefix) for k in keys)


# ----------------------------------------------------------------------------- Qwen-Image -> Qwen-Image-Edit


# the gate: above the light layers' phi (>= 0.96 here), below the heavy ones' (0.80-0.86)
TAU = 0.9


@pytest.fixture(scope="module")
def edit_results(qwen, tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_edit_out")
    return {name: prolora.transfer(qwen["source"], qwen["edit"], lora, d / f"{name}.safetensors", tau=TAU, cache=False)
            for name, lora in qwen["loras"].items()}


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_diffusers_loads_the_edit_transfer(qwen, edit_results, name, caplog):
    """QwenImageLoraLoaderMixin loads the output onto the Edit transformer with no unexpected key;
    it adapts exactly the modules the report transferred (the rest are named in the report), with
    the file's dW, and the fused weights are target + dW."""
    res = edit_results[name]
    got = load_and_fuse(qwen["edit"], res.output, caplog)
    assert not got["unexpected"]
    transferred = {r.target_key for r in res.report.layers if r.transferred}
    dropped = [r for r in res.report.layers if not r.transferred]
    assert got["adapted"] == set(got["deltas"])  # nothing ignored, nothing we did not write
    assert len(got["adapted"]) == len(transferred) > 20
    assert all(r.reason for r in dropped)
    assert {r.module.partition(".")[2] for r in res.report.layers if r.transferred} == got["adapted"]


def test_pin_diffusers_ignores_unprefixed_peft_keys(qwen, caplog):
    """Unprefixed PEFT keys without `.default.` (ComfyUI reads them as Qwen-Image's own LoRA
    format) are not loaded by diffusers 0.42 (its prefix filter); our output of the same file is
    (test_diffusers_loads_the_edit_transfer[peft-bare]), being written under `transformer.`. If
    this fails, diffusers loads them too."""
    got = load_and_fuse(qwen["edit"], qwen["loras"]["peft-bare"], caplog)
    assert not got["adapted"] and got["deltas"]


def test_report_shows_where_qwen_image_and_edit_agree(qwen, edit_results):
    """phi per layer: the Edit target agrees with Qwen-Image everywhere but block 1's image stream,
    which it changed a lot; there phi is lower, and modules under tau are dropped by the gate and
    named with their figures, not written."""
    res = edit_results["peft"]
    rows = {r.module.partition(".")[2]: r for r in res.report.layers}
    heavy = [r for m, r in rows.items() if m.startswith(HEAVY)]
    light = [r for m, r in rows.items() if not m.startswith(HEAVY)]
    assert len(heavy) == 7 and all(r.phi_left is not None and r.phi_right is not None for r in rows.values())
    phi = lambda r: min(r.phi_left, r.phi_right)  # noqa: E731
    assert min(map(phi, light)) > 0.9
    assert max(map(phi, heavy)) < min(map(phi, light))
    gated = [r for r in heavy if not r.transferred]
    assert gated and all(phi(r) < TAU for r in gated) and all(r.transferred for r in light)
    out = read_lora(res.output)
    assert {r.target_key for r in gated}.isdisjoint(out.modules) and len(out.modules) == len(light)
    assert all("phi" in r.reason or "tau" in r.reason for r in gated)
    table = res.report.table()
    assert "transformer.transformer_blocks.1.attn.to_q" in table and "phi_L" in table


def test_cli_transfer_and_similarity_qwen_image_to_edit(qwen, tmp_path, capsys):
    """`prolora transfer` (musubi kohya LoRA with text-encoder modules -> the Edit single file) and
    `prolora similarity` from the command line; the report JSON names every dropped module."""
    from prolora.cli import main

    out, report = tmp_path / "edit_kohya.safetensors", tmp_path / "report.json"
    rc = main(["transfer", str(qwen["source"]), str(qwen["edit_single"]), str(qwen["loras"]["kohya"]), "-o", str(out),
               "--report", str(report), "-q"])
    assert rc == 0 and out.exists()
    rep = json.loads(report.read_text())
    text = json.dumps(rep)
    for k in TE_KEYS:
        assert k in text
    assert "text-encoder (Qwen2.5-VL)" in text
    capsys.readouterr()
    sim = tmp_path / "sim.json"
    assert main(["similarity", str(qwen["source"]), str(qwen["edit_single"]), "--json", str(sim)]) == 0
    layers = json.loads(sim.read_text())["layers"]
    assert len(layers) == 6 + 14 * CFG.num_layers
    by = {r["module"].partition(".")[2]: min(r["phi_left"], r["phi_right"]) for r in layers}
    assert max(v for m, v in by.items() if m.startswith(HEAVY)) < min(v for m, v in by.items()
                                                                       if not m.startswith(HEAVY))
    assert main(["inspect", str(qwen["edit"])]) == 0
    assert "qwen-image" in capsys.readouterr().out


def test_old_diffusers_output_is_refused(qwen, tmp_path):
    from prolora.cli import main

    with pytest.raises(ModelError, match="old diffusers LoRA format exists for UNet models only"):
        prolora.transfer(qwen["source"], qwen["edit"], qwen["loras"]["peft"], tmp_path / "o.safetensors",
                         format="diffusers-old", cache=False)
    assert main(["transfer", str(qwen["source"]), str(qwen["edit"]), str(qwen["loras"]["peft"]), "-o",
                 str(tmp_path / "o2.safetensors"), "--format", "diffusers-old", "-q"]) == 2

