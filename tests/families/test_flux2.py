"""FLUX.2 [klein] base -> distilled (issue 25): readers, the fused slices, LoRA spellings, transfer,
diffusers as the client, and FLUX.1 kept apart.

A tiny REAL diffusers Flux2Transformer2DModel (2 double + 3 single blocks, 2 heads of 16 = width
32, SwiGLU MLP 96) is the [klein] base SOURCE, saved by diffusers as a sharded Flux2KleinPipeline
folder (`is_distilled` false) and as BFL single files (bare and ComfyUI-prefixed; laid out by the
synthetic writer's plan and checked against diffusers' own single-file converter). The
distilled-like TARGET is the same class with the source's weights plus a fine-tune-like change
(`is_distilled` true; the [klein] base and distilled share every shape).

LoRAs are written as the trainers write them (families/flux2/model.py): kohya / musubi
`lora_unet_<BFL>` with alpha (fused qkv, linear1 and img_mlp.0 whole, or in kohya's split_qkv
form) and diffusers' PEFT `transformer.<diffusers>` with lora_adapter_metadata. The output is
loaded with diffusers' Flux2KleinPipeline.load_lora_weights into the target transformer; its dW is
computed here from the output file alone (the test's own name table), and the fused weights must
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
from prolora.families import in_memory_model, open_model  # noqa: E402
from prolora.families.flux2.synthetic import FLUX2_PRESETS, bfl_plan, flux2_config, flux2_params  # noqa: E402
from prolora.formats import read_lora  # noqa: E402
from prolora.lora import LoraFile  # noqa: E402
from prolora.safetensors_io import save  # noqa: E402
from prolora.synthetic import write_lora, write_model  # noqa: E402
from client_flux import perturbed  # noqa: E402
from zoo import lora_pairs, peft_value, read_tensors  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "diffusers_warnings")
ADAPTER = "prolora_out"
CFG = flux2_config("flux2-klein-4b-base", "tiny")  # 2 double + 3 single blocks, width 32
H, M = CFG.hidden, CFG.mlp
LORAS = {"kohya": {"format": "kohya"}, "kohya-split": {"format": "kohya", "split_qkv": True},
         "peft": {"format": "peft"}}
# the test's own table: kohya's flattened BFL module in a block -> diffusers modules (and row chunks)
DOUBLE = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
          "img_mlp_0": ("ff.linear_in",), "img_mlp_2": ("ff.linear_out",),
          "txt_mlp_0": ("ff_context.linear_in",), "txt_mlp_2": ("ff_context.linear_out",)}
SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
BLOCK_LINEARS = CFG.num_layers * 12 + CFG.num_single_layers * 2  # diffusers' Linear modules in the blocks


def _folder(model, folder: Path, distilled: bool) -> Path:
    model.save_pretrained(folder / "transformer", max_shard_size="100KB")  # sharded, with its index
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.36.0", "is_distilled": distilled,
        "transformer": ["diffusers", "Flux2Transformer2DModel"], "text_encoder": ["transformers", "Qwen3ForCausalLM"]}))
    return folder


def bfl_file(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A BFL single file of a state dict, by the synthetic writer's plan (checked against diffusers'
    converter in test_bfl_files_are_diffusers_own)."""
    out = {}
    for key, _, names, swap in bfl_plan(CFG, [(k, tuple(v.shape)) for k, v in sd.items()]):
        t = torch.cat([sd[n] for n in names])
        out[prefix + key] = torch.cat(t.chunk(2)[::-1]) if swap else t
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux2")
    torch.manual_seed(5)
    kw = {k: v for k, v in CFG.diffusers_config().items() if not k.startswith("_")}
    src = diffusers.Flux2Transformer2DModel(**kw).eval()
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    _folder(src, d / "klein-base", distilled=False)
    save(d / "klein_base.safetensors", bfl_file(sd))
    save(d / "klein_base_comfy.safetensors", bfl_file(sd, "model.diffusion_model."))
    tgt = diffusers.Flux2Transformer2DModel(**kw).eval()
    tgt.load_state_dict(perturbed(sd, size=0.05, seed=11), strict=True)
    _folder(tgt, d / "klein", distilled=True)
    loras = {name: write_lora(d / "klein-base", d / f"{name}.safetensors", rank=4, seed=i, **kw)
             for i, (name, kw) in enumerate(LORAS.items())}
    return {"dir": d, "source": d / "klein-base", "target": d / "klein", "state": sd, "kw": kw, "loras": loras,
            "single": d / "klein_base.safetensors", "comfy": d / "klein_base_comfy.safetensors"}


# ----------------------------------------------------------------------------- our output, read independently


def file_deltas(path: Path) -> dict[str, torch.Tensor]:
    """{diffusers module: dW (float64)} of a FLUX.2 LoRA file from its tensors, `.alpha` keys or
    lora_adapter_metadata and the test's own BFL table (none of prolora's maps)."""
    tensors, meta = read_tensors(path)
    cfg = {}
    for k, v in json.loads(meta.get("lora_adapter_metadata", "{}")).items():
        comp, _, field = k.rpartition(".")
        cfg.setdefault(comp, {})[field] = v
    out = {}
    for stem, down, up in lora_pairs(tensors):
        if stem.startswith("lora_unet_"):
            kind, _, rest = stem[len("lora_unet_"):].partition("_blocks_")
            index, _, module = rest.partition("_")
            table, block = (DOUBLE, "transformer_blocks") if kind == "double" else (SINGLE, "single_transformer_blocks")
            targets = [f"{block}.{index}.{n}" for n in table[module]]
        else:
            targets = [stem.removeprefix("transformer.")]
        if "lora_adapter_metadata" in meta:
            name = stem.removeprefix("transformer.")
            r = peft_value(cfg["transformer"], "r", "rank_pattern", name)
            assert r == down.shape[0], stem
            scale = peft_value(cfg["transformer"], "lora_alpha", "alpha_pattern", name) / r
        else:
            alpha = tensors.get(stem + ".alpha")
            scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        dw = scale * (up @ down)
        for i, name in enumerate(targets):
            out[name] = dw if len(targets) == 1 else dw.chunk(len(targets))[i]
    return out


def load_and_fuse(target: Path, path: Path, caplog) -> dict:
    """Load `path` with Flux2KleinPipeline.load_lora_weights onto the target's transformer, check
    diffusers' deltas against the file's, fuse, and check every weight."""
    transformer = diffusers.Flux2Transformer2DModel.from_pretrained(target / "transformer", local_files_only=True)
    pipe = diffusers.Flux2KleinPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                        text_encoder=None, tokenizer=None, transformer=transformer)
    before = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    deltas = file_deltas(path)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    complaints = [s for s in said if any(w in s.lower() for w in ("unexpected", "missing", "unsupported"))]
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
    """The synthetic parameter list is Flux2Transformer2DModel's state dict (names, shapes, order) for
    every preset at tiny, small and full size (meta device); [klein] 4B at full size is 3.9 B."""
    for name in FLUX2_PRESETS:
        for scale in ("tiny", "small", "full"):
            cfg = flux2_config(name, scale)
            with torch.device("meta"):
                m = diffusers.Flux2Transformer2DModel(**{k: v for k, v in cfg.diffusers_config().items()
                                                         if not k.startswith("_")})
            assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == flux2_params(cfg), (name, scale)
    full = dict(flux2_params(flux2_config("flux2-klein-4b")))
    assert full["single_transformer_blocks.19.attn.to_qkv_mlp_proj.weight"] == (3 * 3072 + 2 * 9216, 3072)
    assert full["single_transformer_blocks.0.attn.to_out.weight"] == (3072, 3072 + 9216)
    assert 3.8e9 < sum(torch.Size(s).numel() for s in full.values()) < 4.0e9


def test_bfl_files_are_diffusers_own(pair, tmp_path):
    """The BFL files (the class-built source's, and the synthetic writer's) are what diffusers'
    single-file code detects as FLUX.2 and converts back to the folder's state dict."""
    from diffusers.loaders.single_file_utils import (convert_flux2_transformer_checkpoint_to_diffusers,
                                                     infer_diffusers_model_type)

    for path, prefix in ((pair["single"], ""), (pair["comfy"], "model.diffusion_model.")):
        sd = read_tensors(path)[0]
        assert infer_diffusers_model_type(sd) == "flux-2-dev"
        back = convert_flux2_transformer_checkpoint_to_diffusers({k[len(prefix):]: v for k, v in sd.items()})
        assert set(back) == set(pair["state"]) and all(torch.equal(back[k], pair["state"][k]) for k in back)
    src = write_model(tmp_path / "src", "flux2-klein-4b:tiny", dtype=torch.float32)
    single = write_model(tmp_path / "src.safetensors", "flux2-klein-4b:tiny", layout="single-file", dtype=torch.float32)
    folder = {}
    for f in (src / "transformer").glob("*.safetensors"):
        folder.update(read_tensors(f)[0])
    back = convert_flux2_transformer_checkpoint_to_diffusers(read_tensors(single)[0])
    assert set(back) == set(folder) and all(torch.equal(back[k], folder[k]) for k in back)


def test_every_layout_reads_the_same_model(pair):
    """Folder, bare transformer folder, BFL files (bare, prefixed) and the module in memory: one
    model, the same weights and identity; the fused weights are read as their slices."""
    with open_model(pair["source"]) as ref:
        assert families.of(ref).name == "flux2" and ref.family == "flux2"
        assert ref.variant == "klein-base" and ref.facts["distilled"] is False
        ident, modules = ref.identity(), list(ref.weights)
        # embedders, shared modulation, time (2), final (2); double: 8 attention + 2 x (gate, up, out); single: 5 + 1
        assert len(modules) == 9 + CFG.num_layers * 14 + CFG.num_single_layers * 6
        for path in (pair["source"] / "transformer", pair["single"], pair["comfy"]):
            with open_model(path) as m:
                assert m.family == "flux2" and list(m.weights) == modules, path
                assert m.identity() == ident, path
        with open_model(pair["comfy"]) as m:
            up = m.weights["transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj.mlp_up"]
            assert up.key == "model.diffusion_model.single_blocks.1.linear1.weight"
            assert up.rows == (3 * H + M, 3 * H + 2 * M)
            k = m.weights["transformer.transformer_blocks.0.attn.to_k"]
            assert k.key == "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" and k.rows == (H, 2 * H)
            for name in ("transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj.mlp_up",
                         "transformer.transformer_blocks.0.ff_context.linear_in.gate", "transformer.norm_out.linear"):
                assert torch.equal(m.load(name), ref.load(name)), name
        module = diffusers.Flux2Transformer2DModel.from_pretrained(pair["source"] / "transformer", local_files_only=True)
        mem = in_memory_model(module)
        assert mem.family == "flux2" and mem.identity() == ident
    with open_model(pair["target"]) as t:
        assert t.variant == "klein" and t.facts["distilled"] is True


def test_inspect_names_the_family(pair, capsys):
    for path in (pair["source"], pair["single"]):
        assert main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert "flux2" in out, out
    assert main(["inspect", str(pair["loras"]["kohya"])]) == 0
    assert "flux2" in capsys.readouterr().out


# ----------------------------------------------------------------------------- FLUX.1 and FLUX.2 apart


@pytest.fixture(scope="module")
def flux1(tmp_path_factory):
    """A tiny FLUX.1 model (the same width as the FLUX.2 pair) and its LoRAs in every spelling."""
    d = tmp_path_factory.mktemp("flux1")
    model = write_model(d / "flux1.safetensors", "flux-dev:tiny", layout="single-file")
    loras = {fmt: write_lora(model, d / f"flux1-{fmt}.safetensors", format=fmt, rank=4, seed=i)
             for i, fmt in enumerate(("kohya", "peft", "comfy", "xlabs"))}
    return {"model": model, "loras": loras}


def _bare(path: Path) -> LoraFile:
    lf = read_lora(path)
    lf.metadata.clear()  # told by the key names and shapes alone
    return lf


def test_lora_hints_tell_flux1_and_flux2_apart(pair, flux1, tmp_path):
    """Each family's LoRA hint says its own LoRAs (by names, or by the fused rows of BFL names both
    share: linear1 9h vs 7h, img_mlp.0 6h vs 4h), with or without base-model metadata."""
    for name, path in pair["loras"].items():
        for lf in (read_lora(path), _bare(path)):
            assert families.guess_lora(lf)[0] == "flux2", (name, families.guess_lora(lf))
            assert families.get("flux").lora_hint(lf) is None, name
    comfy = write_lora(pair["single"], tmp_path / "f2-comfy.safetensors", format="comfy", rank=4)
    assert families.guess_lora(_bare(comfy))[0] == "flux2"
    for name, path in flux1["loras"].items():
        for lf in (read_lora(path), _bare(path)):
            assert families.guess_lora(lf)[0] == "flux", (name, families.guess_lora(lf))
            assert families.get("flux2").lora_hint(lf) is None, name


@pytest.mark.parametrize("case", ["flux1-source", "flux2-source", "flux2-lora-on-flux1"])
def test_the_other_generation_is_refused_in_one_line(pair, flux1, tmp_path, capsys, case):
    """A FLUX.1 LoRA onto a FLUX.2 target (with a FLUX.1 source: unrelated architectures; with a
    FLUX.2 source: the LoRA is FLUX.1's), and a FLUX.2 LoRA onto FLUX.1: exit 2, one line naming both
    families, nothing written."""
    bare = tmp_path / "bare.safetensors"
    from prolora.formats import write_lora as write_lora_file

    lf = _bare(flux1["loras"]["kohya"] if case != "flux2-lora-on-flux1" else pair["loras"]["kohya"])
    write_lora_file(bare, lf, lf.format)
    source, target = {"flux1-source": (flux1["model"], pair["target"]),
                      "flux2-source": (pair["single"], pair["target"]),
                      "flux2-lora-on-flux1": (flux1["model"], flux1["model"])}[case]
    out = tmp_path / "out"
    out.mkdir()
    code = main(["transfer", str(source), str(target), str(bare), "-o", str(out / "o.safetensors"),
                 "--report", str(out / "r.json"), "--no-cache"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("prolora: error:"), err
    assert "flux2" in err and ("is flux " in err or "a flux LoRA" in err or "is flux:" in err), err
    if case == "flux1-source":
        assert "unrelated architectures" in err and "training" in err, err
    assert list(out.iterdir()) == []


def test_other_flux2_sizes_are_refused(pair, tmp_path):
    """[klein] 4B, 9B and [dev] share no layer shape: a pair of other widths is refused naming both."""
    small = write_model(tmp_path / "small.safetensors", "flux2-klein-4b:small", layout="single-file")
    with pytest.raises(prolora.errors.ModelError, match="other sizes"):
        prolora.transfer(pair["single"], small, pair["loras"]["peft"], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


# ----------------------------------------------------------------------------- transfer -> diffusers


@pytest.mark.parametrize("name", list(LORAS))
def test_transfer_loads_in_flux2_klein_pipeline(pair, name, tmp_path, caplog):
    """Each spelling onto the distilled-like target: every layer moves (every slice of the fused
    weights); the output keeps the format and the fused keys; Flux2KleinPipeline's own loader takes
    it with no unexpected, missing or unsupported key and fused = target + dW."""
    out = tmp_path / f"{name}.safetensors"
    res = prolora.transfer(pair["single"], pair["target"], pair["loras"][name], out)
    assert res.report.layers and all(r.transferred for r in res.report.layers), res.report.table()
    assert len(res.report.layers) == CFG.num_layers * 14 + CFG.num_single_layers * 6  # per slice
    lf = read_lora(out)
    assert lf.format == read_lora(pair["loras"][name]).format
    if lf.format == "kohya":
        assert "lora_unet_single_blocks_0_linear1" in lf.modules and "lora_unet_double_blocks_0_img_attn_qkv" in lf.modules
    else:
        assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj" in lf.modules
    got = load_and_fuse(pair["target"], out, caplog)
    assert len(got["adapted"]) == BLOCK_LINEARS


@pytest.mark.parametrize("name", ["peft", "kohya-split"])
def test_merged_deltas_equal_the_float64_reference(pair, name, tmp_path):
    """The default backends' merged dW equal the float64 reference transfer's (`--backend reference`)
    within 1e-3 relative, module by module, read from the files independently of prolora."""
    fast = prolora.transfer(pair["source"], pair["target"], pair["loras"][name], tmp_path / "fast.safetensors")
    ref = prolora.transfer(pair["source"], pair["target"], pair["loras"][name], tmp_path / "ref.safetensors",
                           cache=False, backends={"*": "reference"})
    a, b = file_deltas(fast.output), file_deltas(ref.output)
    assert set(a) == set(b) and len(a) == BLOCK_LINEARS
    worst = max(float((a[m] - b[m]).norm() / b[m].norm()) for m in b)
    assert worst < 1e-3, worst


def test_a_fused_lora_comes_back_on_its_own_model(pair, tmp_path):
    """Onto the source itself, each slice's subspaces are its own: the PEFT LoRA's fused modules
    (to_qkv_mlp_proj's five slices, linear_in's two) come back with the same dW."""
    out = tmp_path / "self.safetensors"
    prolora.transfer(pair["source"], pair["source"], pair["loras"]["peft"], out, method="prolora-full")
    a, b = file_deltas(pair["loras"]["peft"]), file_deltas(out)
    for m in ("single_transformer_blocks.2.attn.to_qkv_mlp_proj", "transformer_blocks.1.ff.linear_in"):
        assert float((a[m] - b[m]).norm() / a[m].norm()) < 1e-3, m


def test_slices_are_the_unit_a_reparametrised_model_keeps(pair, tmp_path):
    """q x2, k x0.5 (QK RMSNorm undoes them) and the SwiGLU up rows x2 with the MLP columns of
    to_out / linear_out x0.5 leave diffusers' forward unchanged. Per-slice bases see the same
    subspaces (phi 1.000 on every slice of to_qkv_mlp_proj and linear_in) and those modules come
    back with the same dW. The single blocks' to_out is read whole (its attention and MLP parts are
    column blocks, keys.py): its subspaces move (phi below 1), the limit docs/formats.md names."""
    sd = {k: v.double() for k, v in pair["state"].items()}
    re_sd = dict(sd)
    for i in range(CFG.num_single_layers):
        b = f"single_transformer_blocks.{i}.attn"
        w = sd[f"{b}.to_qkv_mlp_proj.weight"].clone()
        w[:H] *= 2
        w[H:2 * H] *= 0.5
        w[3 * H + M:] *= 2
        re_sd[f"{b}.to_qkv_mlp_proj.weight"] = w
        o = sd[f"{b}.to_out.weight"].clone()
        o[:, H:] *= 0.5
        re_sd[f"{b}.to_out.weight"] = o
    for i in range(CFG.num_layers):
        for ff in ("ff", "ff_context"):
            w = sd[f"transformer_blocks.{i}.{ff}.linear_in.weight"].clone()
            w[M:] *= 2
            re_sd[f"transformer_blocks.{i}.{ff}.linear_in.weight"] = w
            re_sd[f"transformer_blocks.{i}.{ff}.linear_out.weight"] = sd[f"transformer_blocks.{i}.{ff}.linear_out.weight"] * 0.5
    models = []
    for state in (sd, re_sd):
        m = diffusers.Flux2Transformer2DModel(**pair["kw"]).double().eval()
        m.load_state_dict(state, strict=True)
        models.append(m)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, CFG.in_channels, generator=g, dtype=torch.float64)
    ctx = torch.randn(1, 6, CFG.joint_attention_dim, generator=g, dtype=torch.float64)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.zeros(1), torch.arange(4.), torch.arange(4.),
                                         indexing="ij"), -1).reshape(-1, 4)
    txt_ids = torch.cat([torch.zeros(6, 3), torch.arange(6.)[:, None]], 1)
    with torch.no_grad():
        outs = [m(x, ctx, torch.tensor([0.5], dtype=torch.float64), img_ids, txt_ids).sample for m in models]
    assert float((outs[0] - outs[1]).norm() / outs[0].norm()) < 1e-6  # RMSNorm's eps aside, the same model
    models[1].float().save_pretrained(tmp_path / "re" / "transformer")
    (tmp_path / "re" / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    out = tmp_path / "re.safetensors"
    res = prolora.transfer(pair["source"], tmp_path / "re", pair["loras"]["peft"], out, method="prolora-full")
    assert all(r.transferred for r in res.report.layers), res.report.table()
    whole_cols = [r for r in res.report.layers if r.module.startswith("transformer.single_") and r.module.endswith(".to_out")]
    assert len(whole_cols) == CFG.num_single_layers and all(min(r.phi_left, r.phi_right) < 0.99 for r in whole_cols)
    assert all(min(r.phi_left, r.phi_right) > 0.9999 for r in res.report.layers if r not in whole_cols), \
        res.report.table()
    a, b = file_deltas(pair["loras"]["peft"]), file_deltas(out)
    kept = [m for m in a if not (m.startswith("single_") and m.endswith(".to_out"))]
    assert max(float((a[m] - b[m]).norm() / a[m].norm()) for m in kept) < 1e-3


def test_load_lora_onto_a_klein_pipeline_in_memory(pair, caplog):
    """prolora.diffusers.load_lora onto a Flux2KleinPipeline held in memory (its transformer read as
    the target, `is_distilled` as the variant): the adapter loads with no complaint and is the
    transfer's dW on every block linear."""
    import prolora.diffusers

    transformer = diffusers.Flux2Transformer2DModel.from_pretrained(pair["target"] / "transformer", local_files_only=True)
    pipe = diffusers.Flux2KleinPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                        text_encoder=None, tokenizer=None, transformer=transformer, is_distilled=True)
    assert in_memory_model(pipe).variant == "klein"
    with caplog.at_level(logging.WARNING):
        report = prolora.diffusers.load_lora(pipe, pair["loras"]["kohya"], source=pair["single"], adapter_name="x",
                                             cache=False)
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()]
    assert all(r.transferred for r in report.layers)
    adapted = [n for n, layer in transformer.named_modules() if hasattr(layer, "lora_A") and "x" in layer.lora_A]
    assert len(adapted) == BLOCK_LINEARS
