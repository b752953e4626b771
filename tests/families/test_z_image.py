"""Z-Image Base -> Turbo (issue 25): readers, LoRA spellings, transfer, and diffusers as the client.

A tiny REAL diffusers ZImageTransformer2DModel (the real layout: 2 main blocks, a noise and a
context refiner block, width 64) is the Z-Image SOURCE, saved by diffusers as a sharded pipeline
folder, and as ComfyUI's single file (original names, each attention's q, k, v fused into
`attention.qkv`; written here by the test's own table, checked against diffusers' single-file
converter). The Turbo-like TARGET is the same class with the source's weights plus a fine-tune-like
change (Turbo is Base distilled: the same names and shapes).

LoRAs are written as the trainers write them (families/z_image/model.py): musubi-tuner's kohya
`lora_unet_layers_0_attention_to_q` with alpha, diffusers' PEFT `transformer....lora_A/B` with
lora_adapter_metadata, ai-toolkit's `diffusion_model....lora_A/B`, and musubi's ComfyUI conversion
(`lora_unet_layers_0_attention_qkv`, kohya's split_qkv layout). The output is loaded with diffusers'
ZImagePipeline.load_lora_weights (ZImageLoraLoaderMixin) into the target transformer; its dW is
computed here from the output file alone (the test's own name tables), and the fused weights must
equal target + dW. The conformance suite covers the synthetic models' other layouts and spellings.
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

import prolora  # noqa: E402
from prolora import families  # noqa: E402
from prolora.cli import main  # noqa: E402
from prolora.errors import ModelError  # noqa: E402
from prolora.families import in_memory_model, open_model  # noqa: E402
from prolora.families.z_image.synthetic import write_z_image_lora, z_image_config, z_image_params  # noqa: E402
from prolora.formats import read_lora  # noqa: E402
from prolora.safetensors_io import save  # noqa: E402
from client_flux import perturbed  # noqa: E402
from zoo import lora_pairs, peft_value, read_tensors  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "diffusers_warnings")
ADAPTER = "prolora_out"
CFG = z_image_config("z-image:tiny")  # 2 blocks + 1 noise / 1 context refiner block, 2 heads of 32 = width 64
H = CFG.dim
# LoRA name -> write_z_image_lora keyword arguments (targets "transformer": every linear of the blocks)
LORAS = {"musubi": {"format": "kohya"}, "peft": {"format": "peft"}, "ai-toolkit": {"format": "comfy", "lora_ab": True},
         "kohya-comfy": {"format": "kohya", "spelling": "kohya-ldm", "split_qkv": True}}
# ComfyUI's original names for diffusers' (the test's own table: diffusers' single-file converter inverted)
COMFY = {"all_x_embedder.2-1.": "x_embedder.", "all_final_layer.2-1.": "final_layer.",
         ".attention.to_out.0.": ".attention.out.", ".attention.norm_q.": ".attention.q_norm.",
         ".attention.norm_k.": ".attention.k_norm."}
QKV = (".attention.to_q.", ".attention.to_k.", ".attention.to_v.")


def _comfy(name: str) -> str:
    for a, b in COMFY.items():
        name = name.replace(a, b)
    return name


def comfy_file(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """ComfyUI's single file of a transformer state dict: original names, q, k, v fused."""
    out = {}
    for k, v in sd.items():
        if QKV[1] in k or QKV[2] in k:
            continue
        if QKV[0] in k:
            out[prefix + k.replace(QKV[0], ".attention.qkv.")] = torch.cat([sd[k.replace(QKV[0], x)] for x in QKV])
        else:
            out[prefix + _comfy(k)] = v
    return out


def _folder(model, folder: Path) -> Path:
    model.save_pretrained(folder / "transformer", max_shard_size="200KB")  # sharded, with its index
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "ZImagePipeline", "_diffusers_version": "0.36.0",
        "transformer": ["diffusers", "ZImageTransformer2DModel"], "text_encoder": ["transformers", "Qwen3Model"]}))
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("z_image")
    torch.manual_seed(7)
    src = diffusers.ZImageTransformer2DModel(**CFG.model_config()).eval()
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    _folder(src, d / "z-image")
    save(d / "z_image_bf16.safetensors", {k: v.to(torch.bfloat16) for k, v in comfy_file(sd).items()})
    save(d / "z_image_prefixed.safetensors", comfy_file(sd, "model.diffusion_model."))
    save(d / "z_image_diffusers.safetensors", sd)
    turbo = diffusers.ZImageTransformer2DModel(**CFG.model_config()).eval()
    turbo.load_state_dict(perturbed(sd, size=0.05, seed=11), strict=True)
    _folder(turbo, d / "z-image-turbo")
    loras = {name: write_z_image_lora(d / "z-image", d / f"{name}.safetensors", rank=4, seed=i, **kw)
             for i, (name, kw) in enumerate(LORAS.items())}
    return {"dir": d, "source": d / "z-image", "target": d / "z-image-turbo", "state": sd, "loras": loras,
            "single": d / "z_image_prefixed.safetensors", "bf16": d / "z_image_bf16.safetensors",
            "diffusers_file": d / "z_image_diffusers.safetensors"}


# ----------------------------------------------------------------------------- our output, read independently


def _linears() -> list[str]:
    with torch.device("meta"):
        m = diffusers.ZImageTransformer2DModel(**CFG.model_config())
    return [n for n, layer in m.named_modules() if isinstance(layer, torch.nn.Linear)]


def file_deltas(path: Path) -> dict[str, torch.Tensor]:
    """{diffusers module: dW (float64)} of a Z-Image LoRA file from its tensors, `.alpha` keys or
    lora_adapter_metadata and diffusers' module names (none of prolora's maps): `transformer.` /
    `diffusion_model.` + the name, `lora_unet_` + the name flattened, or + ComfyUI's name flattened,
    whose fused `attention_qkv` rows are q's, k's and v's."""
    tensors, meta = read_tensors(path)
    cfg = {}
    for k, v in json.loads(meta.get("lora_adapter_metadata", "{}")).items():
        comp, _, field = k.rpartition(".")
        cfg.setdefault(comp, {})[field] = v
    names = _linears()
    flat = {n.replace(".", "_"): [(n, None)] for n in names}
    for n in names:
        if n.endswith(".attention.to_q"):
            block = n[: -len(".attention.to_q")]
            flat[f"{block}_attention_qkv".replace(".", "_")] = [(block + x[:-1], i) for i, x in enumerate(QKV)]
        elif not n.endswith((".attention.to_k", ".attention.to_v")):
            flat.setdefault(_comfy(n + ".")[:-1].replace(".", "_"), [(n, None)])
    out = {}
    for stem, down, up in lora_pairs(tensors):
        if stem.startswith("lora_unet_"):
            targets = flat[stem[len("lora_unet_"):]]
        else:
            targets = [(stem.removeprefix("transformer.").removeprefix("diffusion_model."), None)]
        if "lora_adapter_metadata" in meta:
            name = stem.removeprefix("transformer.")
            r = peft_value(cfg["transformer"], "r", "rank_pattern", name)
            assert r == down.shape[0], stem
            scale = peft_value(cfg["transformer"], "lora_alpha", "alpha_pattern", name) / r
        else:
            alpha = tensors.get(stem + ".alpha")
            scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        dw = scale * (up @ down)
        for name, i in targets:
            assert name in names, stem
            out[name] = dw if i is None else dw.chunk(3)[i]
    return out


def load_and_fuse(target: Path, path: Path, caplog) -> dict:
    """Load `path` with ZImagePipeline.load_lora_weights onto the target's transformer, check
    diffusers' deltas against the file's, fuse, and check every weight."""
    transformer = diffusers.ZImageTransformer2DModel.from_pretrained(target / "transformer", local_files_only=True)
    pipe = diffusers.ZImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=None, tokenizer=None, transformer=transformer)
    before = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    deltas = file_deltas(path)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    complaints = [s for s in said if "unexpected" in s.lower() or "missing" in s.lower()]
    assert not complaints, complaints[:3]
    adapted = {name: layer for name, layer in transformer.named_modules()
               if hasattr(layer, "lora_A") and ADAPTER in layer.lora_A}
    assert set(adapted) == set(deltas)
    live = {}
    for module, layer in adapted.items():
        a, b = layer.lora_A[ADAPTER].weight.detach().double(), layer.lora_B[ADAPTER].weight.detach().double()
        live[module] = layer.scaling[ADAPTER] * (b @ a)
        # diffusers folds a kohya alpha into A and B in the file's dtype (fp16 rounding); PEFT is applied as stored
        err = float((live[module] - deltas[module]).norm() / deltas[module].norm())
        assert err < 2e-3, (module, err)
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()
    after = transformer.state_dict()
    for k, w0 in before.items():
        module = k[: -len(".weight")] if k.endswith(".weight") else None
        if module in adapted:
            err = float((after[k].double() - (w0.double() + live[module])).norm() / live[module].norm())
            assert err < 1e-5, (module, err)
        else:
            assert torch.equal(after[k], w0), k
    return {"adapted": set(adapted), "deltas": deltas}


# ----------------------------------------------------------------------------- layout and detection


def test_synthetic_params_are_the_class():
    """families.z_image.synthetic's parameter list is ZImageTransformer2DModel's state dict (names, shapes,
    order): tiny, Omni (SigLIP branch) and Z-Image's published size (6.15 B parameters, meta device)."""
    from dataclasses import replace

    for cfg in (CFG, replace(CFG, siglip_feat_dim=48), z_image_config("z-image")):
        with torch.device("meta"):
            m = diffusers.ZImageTransformer2DModel(**cfg.model_config())
        assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == z_image_params(cfg)
    full = dict(z_image_params(z_image_config("z-image")))
    assert full["layers.29.feed_forward.w1.weight"] == (10240, 3840)
    assert full["cap_embedder.1.weight"] == (3840, 2560)
    assert sum(torch.Size(s).numel() for s in full.values()) == 6_154_908_736


def test_comfy_single_file_is_diffusers_own(pair, tmp_path):
    """The test's ComfyUI file is what diffusers' single-file code detects as Z-Image and converts back
    to the folder's state dict; the synthetic writer's original layout converts to its folder too."""
    from diffusers.loaders.single_file_utils import (convert_z_image_transformer_checkpoint_to_diffusers,
                                                     infer_diffusers_model_type)
    from prolora.synthetic import write_model

    sd = comfy_file(pair["state"], "model.diffusion_model.")
    assert infer_diffusers_model_type(sd) == "z-image-turbo"
    back = convert_z_image_transformer_checkpoint_to_diffusers(dict(sd))
    assert set(back) == set(pair["state"]) and all(torch.equal(back[k], pair["state"][k]) for k in back)
    src = write_model(tmp_path / "src", "z-image:tiny", dtype=torch.float32)
    single = write_model(tmp_path / "src.safetensors", "z-image:tiny", layout="single-file", dtype=torch.float32)
    folder = {}
    for f in (src / "transformer").glob("*.safetensors"):
        folder.update(read_tensors(f)[0])
    back = convert_z_image_transformer_checkpoint_to_diffusers(read_tensors(single)[0])
    assert set(back) == set(folder) and all(torch.equal(back[k], folder[k]) for k in back)


def test_every_layout_reads_the_same_model(pair):
    """Folder, bare transformer folder, ComfyUI's file (bare, bf16; prefixed), diffusers-named file
    and the module in memory: one model, the same weights and identity; q, k, v of the fused files
    are row slices of attention.qkv."""
    with open_model(pair["source"]) as ref:
        assert families.of(ref).name == "z-image" and ref.family == "z-image"
        ident, modules = ref.identity(), list(ref.weights)
        assert len(modules) == 2 * 8 + 8 + 7 + 4 + 2  # main blocks, noise / context refiner, embedders, final layer
        for path in (pair["source"] / "transformer", pair["single"], pair["diffusers_file"]):
            with open_model(path) as m:
                assert m.family == "z-image" and list(m.weights) == modules, path
                assert m.identity() == ident, path
        with open_model(pair["single"]) as m:
            q = m.weights["transformer.layers.1.attention.to_k"]
            assert q.key == "model.diffusion_model.layers.1.attention.qkv.weight" and q.rows == (H, 2 * H)
            assert torch.equal(m.load("transformer.layers.1.attention.to_k"), ref.load("transformer.layers.1.attention.to_k"))
        with open_model(pair["bf16"]) as m:
            assert m.facts["naming"] == "original" and set(m.weights) == set(modules)
        module = diffusers.ZImageTransformer2DModel.from_pretrained(pair["source"] / "transformer", local_files_only=True)
        mem = in_memory_model(module)
        assert mem.family == "z-image" and mem.identity() == ident


def test_inspect_names_the_family(pair, capsys):
    for path in (pair["source"], pair["single"]):
        assert main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert "z-image" in out, out
    assert main(["inspect", str(pair["loras"]["musubi"])]) == 0
    assert "z-image" in capsys.readouterr().out


def test_lumina2_and_partial_files_are_not_z_image(pair, tmp_path):
    """Lumina 2's file has the same original names but adaLN_modulation.1 and grouped attention: it is
    refused by name, never read as Z-Image; a Z-Image file without its embedder is no whole model;
    a folder of another class is not claimed."""
    lumina = {k.replace("adaLN_modulation.0", "adaLN_modulation.1"): v for k, v in comfy_file(pair["state"]).items()}
    save(tmp_path / "lumina.safetensors", lumina)
    with pytest.raises(ModelError, match="Lumina 2"):
        open_model(tmp_path / "lumina.safetensors")
    gqa = dict(comfy_file(pair["state"]))
    gqa["layers.0.attention.qkv.weight"] = gqa["layers.0.attention.qkv.weight"][: 2 * H]
    save(tmp_path / "gqa.safetensors", gqa)
    with pytest.raises(ModelError, match="Lumina 2"):
        open_model(tmp_path / "gqa.safetensors")
    partial = {k: v for k, v in comfy_file(pair["state"]).items() if not k.startswith("x_embedder.")}
    save(tmp_path / "partial.safetensors", partial)
    with pytest.raises(ModelError, match="not a whole Z-Image transformer"):
        open_model(tmp_path / "partial.safetensors")
    other = tmp_path / "other"
    (other / "transformer").mkdir(parents=True)
    (other / "transformer" / "config.json").write_text(json.dumps({"_class_name": "Lumina2Transformer2DModel"}))
    with pytest.raises(ModelError, match="Lumina 2"):
        open_model(other)


def test_lora_spellings_say_z_image(pair):
    for name, path in pair["loras"].items():
        assert families.guess_lora(read_lora(path))[0] == "z-image", name


# ----------------------------------------------------------------------------- transfer -> diffusers


@pytest.mark.parametrize("name", list(LORAS))
def test_transfer_loads_in_zimage_pipeline(pair, name, tmp_path, caplog):
    """Each spelling onto the Turbo-like target: every layer moves; the output keeps the format
    (musubi's kohya names become ComfyUI's: fused attention_qkv, attention_out); ZImagePipeline's own
    loader takes it with no unexpected or missing key and fused = target + dW."""
    out = tmp_path / f"{name}.safetensors"
    res = prolora.transfer(pair["single"], pair["target"], pair["loras"][name], out)
    assert all(r.transferred for r in res.report.layers), res.report.table()
    lf = read_lora(out)
    assert lf.format == read_lora(pair["loras"][name]).format
    if lf.format == "kohya":
        assert "lora_unet_layers_0_attention_qkv" in lf.modules and "lora_unet_layers_0_attention_out" in lf.modules
        assert not any("to_q" in k or "to_out" in k for k in lf.modules)
    got = load_and_fuse(pair["target"], out, caplog)
    assert len(got["adapted"]) == 2 * 8 + 8 + 7  # every linear of the blocks


@pytest.mark.parametrize("name", ["peft", "kohya-comfy"])
def test_merged_deltas_equal_the_float64_reference(pair, name, tmp_path):
    """The default backends' merged dW equal the float64 reference transfer's (`--backend reference`)
    within 1e-3 relative, module by module, read from the files independently of prolora."""
    fast = prolora.transfer(pair["source"], pair["target"], pair["loras"][name], tmp_path / "fast.safetensors")
    ref = prolora.transfer(pair["source"], pair["target"], pair["loras"][name], tmp_path / "ref.safetensors",
                           cache=False, backends={"*": "reference"})
    a, b = file_deltas(fast.output), file_deltas(ref.output)
    assert set(a) == set(b) and len(a) == 2 * 8 + 8 + 7
    worst = max(float((a[m] - b[m]).norm() / b[m].norm()) for m in b)
    assert worst < 1e-3, worst
