"""Flux: base-model readers (BFL single files, diffusers folders), the BFL <-> diffusers map, LoRA
formats (kohya BFL / split_qkv / lora_transformer_, ComfyUI, XLabs, PEFT), fused <-> split slices,
FLUX.1-dev -> schnell, synthetic Flux models, and the fused-vs-slice measurement.

Real models are tiny FluxTransformer2DModel configs built by diffusers; the map is also checked at
FLUX.1's real row counts against diffusers' own converters (with 1-column weights, so that it is
cheap). Runs offline.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from zoo import FLUX_H, FLUX_MLP, FLUX_TINY, bfl_tensors  # noqa: E402

import prolora  # noqa: E402
from prolora.families import open_model  # noqa: E402
from prolora.families.flux.keys import bfl_to_diffusers, diffusers_to_bfl  # noqa: E402
from prolora.errors import LoraMismatchError, ModelError  # noqa: E402
from prolora.formats import read_lora, summarize, write_lora  # noqa: E402
from prolora.formats.parts import (assemble_parts, canonical_modules, parse_part_key, part_key,  # noqa: E402
                                   split_module)
from prolora.lora import LoraFile, LoraModule  # noqa: E402
from prolora.safetensors_io import save  # noqa: E402
from prolora.synthetic import flux_config, flux_params, write_lora as synth_lora, write_model  # noqa: E402

TINY, H, MLP = FLUX_TINY, FLUX_H, FLUX_MLP

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny diffusers-built Flux (dev-like) saved four ways, and its state dict."""
    diffusers = pytest.importorskip("diffusers")
    d = tmp_path_factory.mktemp("flux_real")
    torch.manual_seed(0)
    m = diffusers.FluxTransformer2DModel(**TINY).eval()
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    m.save_pretrained(d / "pipe" / "transformer", max_shard_size="40KB")
    (d / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    save(d / "bfl.safetensors", bfl_tensors(sd))
    save(d / "comfy.safetensors", bfl_tensors(sd, "model.diffusion_model."))
    return {"dir": d, "state": sd, "pipe": d / "pipe", "bare": d / "pipe" / "transformer",
            "bfl": d / "bfl.safetensors", "comfy": d / "comfy.safetensors"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Synthetic tiny FLUX.1-dev source (BFL file), target (diffusers folder, source + perturbation),
    a schnell-like target, and LoRAs on the source in every format."""
    d = tmp_path_factory.mktemp("flux_pair")
    src = write_model(d / "src.safetensors", "flux-dev:tiny", layout="single-file", seed=0)
    tgt = write_model(d / "tgt", "flux-dev:tiny", layout="diffusers", seed=0, base=src, shard_bytes=60_000)
    schnell = write_model(d / "schnell.safetensors", "flux-schnell:tiny", layout="single-file-prefixed", seed=0)
    loras = {
        "kohya": synth_lora(src, d / "kohya.safetensors", "kohya", rank=4, targets="all"),
        "kohya-split": synth_lora(src, d / "split.safetensors", "kohya", rank=4, split_qkv=True, seed=1),
        # diffusers reads lora_transformer_ names for attention and embedder modules only
        "kohya-diffusers": synth_lora(src, d / "ktr.safetensors", "kohya", rank=4, spelling="kohya-diffusers",
                                      targets="attn", seed=2),
        "comfy": synth_lora(src, d / "comfy.safetensors", "comfy", rank=4, seed=3),
        "xlabs": synth_lora(src, d / "xlabs.safetensors", "xlabs", rank=4, seed=4),
        "peft": synth_lora(src, d / "peft.safetensors", "peft", rank=4, seed=5),
    }
    return {"dir": d, "source": src, "target": tgt, "schnell": schnell, "loras": loras}


def deltas(lf: LoraFile, model) -> dict[str, torch.Tensor]:
    """{canonical module: dW (float64)} of a LoRA, slices of fused modules cut by the model's map."""
    out = {}
    for key, m in lf.modules.items():
        dw = m.scale * (m.up.double() @ m.down.double())
        hit = model.resolve(key)
        if hit is not None:
            out[hit[0]] = dw
            continue
        fh = model.resolve_fused(key)
        assert fh is not None, key
        for s in fh.slices:
            part = torch.cat([dw[a:b] for a, b in s.rows])
            if part.abs().max() > 0:
                out[s.module] = part
    return out


# ----------------------------------------------------------------------------- synthetic shapes


def _meta_state(**kw):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        m = diffusers.FluxTransformer2DModel(**kw)
    return [(k, tuple(v.shape)) for k, v in m.state_dict().items()]


@pytest.mark.parametrize("name, guidance", [("flux-dev", True), ("flux-schnell", False)])
def test_full_size_params_are_diffusers_flux(name, guidance):
    ours = flux_params(flux_config(name))
    assert ours == _meta_state(guidance_embeds=guidance)
    from collections import Counter
    c = Counter(s for n, s in ours if n.endswith(".weight") and len(s) == 2)
    assert c[(3072, 3072)] == (269 if guidance else 268)
    assert (c[(12288, 3072)], c[(18432, 3072)], c[(3072, 12288)], c[(9216, 3072)], c[(3072, 15360)]) == (76, 38, 38, 38, 38)
    assert sum(math.prod(s) for _, s in ours) * 2 / 1e9 == pytest.approx(23.8, abs=0.1)  # bf16 GB


@pytest.mark.parametrize("scale", ["small", "tiny"])
def test_scaled_params_are_diffusers_flux(scale):
    cfg = flux_config("flux-dev", scale, blocks=(3, 2))
    assert flux_params(cfg) == _meta_state(**{k: v for k, v in cfg.diffusers_config().items() if not k.startswith("_")})


# ----------------------------------------------------------------------------- the map vs diffusers


@pytest.mark.parametrize("guidance", [True, False])
def test_bfl_file_map_matches_diffusers_converter(guidance):
    """Our diffusers -> BFL file layout, run back through diffusers' own single-file converter at
    FLUX.1's real row counts (3072 is hard-coded there), gives every parameter back exactly. Weights
    are [rows, 1] tensors whose values are unique ids, so every row's destination is checked."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    params = _meta_state(num_layers=2, num_single_layers=2, guidance_embeds=guidance)
    sd, at = {}, 0
    for name, shape in params:
        n = shape[0]
        sd[name] = torch.arange(at, at + n, dtype=torch.float64).reshape(n, *([1] if len(shape) == 2 else []))
        at += n
    for prefix in ("", "model.diffusion_model."):
        converted = convert_flux_transformer_checkpoint_to_diffusers(bfl_tensors(sd, prefix))
        assert set(converted) == set(sd)
        for k, v in sd.items():
            assert torch.equal(converted[k], v), k


def test_reader_map_is_inverse_of_writer_map():
    params = flux_params(flux_config("flux-dev", "tiny", blocks=(2, 3)))
    shapes = {n[:-7]: s for n, s in params if n.endswith(".weight") and len(s) == 2}
    forward = diffusers_to_bfl(shapes)
    bfl_shapes = {}
    for path, place in forward.items():
        bfl_shapes[place.path] = (place.total, shapes[path][1])
    back, unmapped = bfl_to_diffusers(bfl_shapes)
    assert back == forward and not unmapped
    assert set(forward) == set(shapes)


# ----------------------------------------------------------------------------- base readers


@pytest.mark.parametrize("layout", ["pipe", "bare", "bfl", "comfy"])
def test_readers_give_diffusers_weights(real, layout):
    with open_model(real[layout]) as m:
        assert m.family == "flux" and m.variant == "dev"
        sd = real["state"]
        two_d = {k[:-7] for k, v in sd.items() if v.dim() == 2}
        assert {w.partition(".")[2] for w in m.weights} == two_d
        for module in m.weights:
            assert torch.equal(m.load(module, None), sd[module.partition(".")[2] + ".weight"]), module
        facts = m.describe()
        assert (facts["double_blocks"], facts["single_blocks"], facts["hidden"], facts["mlp_hidden"]) == (2, 3, H, MLP)
        assert facts["guidance_embedder"] and "unmapped" not in facts
        if layout == "pipe":
            assert len(m.files) > 3  # sharded
        if layout in ("bfl", "comfy"):
            q = m.weights["transformer.single_transformer_blocks.1.proj_mlp"]
            assert q.key.endswith("single_blocks.1.linear1.weight") and q.rows == (3 * H, 3 * H + MLP)
            assert m.weights["transformer.norm_out.linear"].pieces == ((H, 2 * H), (0, H))


def test_readers_refuse_partial_flux(tmp_path):
    path = tmp_path / "partial.safetensors"
    save(path, {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)})
    with pytest.raises(ModelError, match="Flux"):
        open_model(path)


def test_spellings_of_every_tool(real):
    with open_model(real["bfl"]) as m:
        assert m.kohya_spelling == "kohya-ldm"
        q = "transformer.transformer_blocks.1.attn.to_q"
        assert m.resolve("transformer.transformer_blocks.1.attn.to_q") == (q, "peft")
        assert m.resolve("lora_transformer_transformer_blocks_1_attn_to_q") == (q, "kohya-diffusers")
        assert m.resolve("lora_unet_double_blocks_1_img_attn_proj") == ("transformer.transformer_blocks.1.attn.to_out.0",
                                                                         "kohya-ldm")
        assert m.resolve("diffusion_model.single_blocks.2.linear2")[0] == "transformer.single_transformer_blocks.2.proj_out"
        assert m.resolve("double_blocks.0.processor.proj_lora2") == ("transformer.transformer_blocks.0.attn.to_add_out", "xlabs")
        assert m.resolve("lora_unet_guidance_in_in_layer")[0] == "transformer.time_text_embed.guidance_embedder.linear_1"
        fh = m.resolve_fused("lora_unet_double_blocks_1_img_attn_qkv")
        assert fh.rows == 3 * H and [s.module.rsplit(".", 1)[1] for s in fh.slices] == ["to_q", "to_k", "to_v"]
        fh = m.resolve_fused("diffusion_model.single_blocks.0.linear1")
        assert fh.rows == 3 * H + MLP and fh.slices[3].rows == ((3 * H, 3 * H + MLP),)
        fh = m.resolve_fused("single_blocks.0.processor.qkv_lora")
        assert fh.rows == 3 * H and len(fh.slices) == 3 and fh.spelling == "xlabs"
        fh = m.resolve_fused("lora_unet_final_layer_adaLN_modulation_1")
        assert fh.slices[0].rows == ((H, 2 * H), (0, H))
        assert m.spell_fused(q, "kohya-ldm") == ("lora_unet_double_blocks_1_img_attn_qkv", 3 * H, ((0, H),))
        assert m.spell_fused(q, "xlabs") == ("double_blocks.1.processor.qkv_lora1", 3 * H, ((0, H),))
        assert m.unspellable("transformer.single_transformer_blocks.0.proj_mlp", "xlabs")
        assert m.unspellable("transformer.single_transformer_blocks.0.attn.to_v", "xlabs") is None
        assert m.spell("transformer.x_embedder", "comfy") == "diffusion_model.img_in"
        assert "guidance" in m.missing_hint("transformer.time_text_embed.guidance_embedder.linear_1")


# ----------------------------------------------------------------------------- LoRA formats


def test_formats_detected_and_round_trip(pair, tmp_path):
    expect = {"kohya": "kohya", "kohya-split": "kohya", "kohya-diffusers": "kohya", "comfy": "comfy",
              "xlabs": "xlabs", "peft": "peft"}
    for name, path in pair["loras"].items():
        lf = read_lora(path)
        assert lf.format == expect[name]
        assert summarize(lf)["family"] == "flux"
        out = tmp_path / f"{name}.safetensors"
        write_lora(out, lf)
        again = read_lora(out)
        assert set(again.modules) == set(lf.modules)
        for k, m in lf.modules.items():
            a = again.modules[k]
            assert torch.allclose(a.scale * a.up.double() @ a.down.double(), m.scale * m.up.double() @ m.down.double(),
                                  rtol=1e-3, atol=1e-6), (name, k)


def test_xlabs_prefixed_and_split_qkv_shapes(pair, tmp_path):
    lf = read_lora(pair["loras"]["xlabs"])
    pre = LoraFile("xlabs", {"diffusion_model." + k: LoraModule("diffusion_model." + k, m.down, m.up)
                             for k, m in lf.modules.items()})
    write_lora(tmp_path / "pre.safetensors", pre)
    assert read_lora(tmp_path / "pre.safetensors").format == "xlabs"
    with open_model(pair["source"]) as src:
        assert deltas(read_lora(tmp_path / "pre.safetensors"), src).keys() == deltas(lf, src).keys()
    split = read_lora(pair["loras"]["kohya-split"]).modules["lora_unet_double_blocks_0_img_attn_qkv"]
    assert tuple(split.down.shape) == (12, H) and tuple(split.up.shape) == (3 * H, 12)
    assert split.up[:H, 4:].abs().max() == 0 and split.up[H:2 * H, :4].abs().max() == 0


def test_keys_against_diffusers_conversion(pair):
    """diffusers' FluxPipeline.lora_state_dict on our files gives, per diffusers module, the dW we
    read (kohya/comfy: diffusers hard-codes linear1's 3072-row split, checked separately below)."""
    from diffusers import FluxPipeline

    with open_model(pair["source"]) as src:
        for name, path in pair["loras"].items():
            lf = read_lora(path)
            ours = deltas(lf, src)
            if name in ("kohya", "kohya-split", "comfy"):
                keep = {k: m for k, m in lf.modules.items() if "linear1" not in k}
                path = pair["dir"] / f"nolinear1_{name}.safetensors"
                write_lora(path, LoraFile(lf.format, keep, dict(lf.metadata)))
                ours = deltas(LoraFile(lf.format, keep), src)
            sd = FluxPipeline.lora_state_dict(str(path))
            theirs = {}
            for k, a in sd.items():
                if k.endswith(".lora_A.weight"):
                    stem = k[: -len(".lora_A.weight")]
                    b = sd[stem + ".lora_B.weight"]
                    # kohya/comfy/XLabs/lora_transformer_: diffusers folds alpha into A and B; peft
                    # files keep it in lora_adapter_metadata (checked by the client test)
                    scale = lf.modules[stem].scale if name == "peft" else 1.0
                    # diffusers 0.42 converts kohya's global modules (img_in, txt_in, time_in,
                    # vector_in, guidance_in, final_layer) without the `transformer.` prefix
                    theirs["transformer." + stem.removeprefix("transformer.")] = scale * (b.double() @ a.double())
            assert set(theirs) == set(ours), (name, sorted(set(theirs) ^ set(ours))[:4])
            for k, v in ours.items():
                assert torch.allclose(theirs[k], v, rtol=1e-3, atol=1e-5), (name, k)


def test_linear1_split_at_real_rows_matches_diffusers(tmp_path):
    """A kohya linear1 LoRA at FLUX.1's real rows (21504 = 3 x 3072 + 12288), plain and split_qkv,
    cut into q, k, v, proj_mlp by our map exactly as diffusers' converter cuts it."""
    from diffusers import FluxPipeline

    h, mlp = 3072, 12288
    model = tmp_path / "bfl_rows.safetensors"
    save(model, {"img_in.weight": torch.zeros(h, 2), "single_blocks.0.linear1.weight": torch.zeros(3 * h + mlp, 8),
                 "single_blocks.0.linear2.weight": torch.zeros(h, 8),
                 "single_blocks.0.modulation.lin.weight": torch.zeros(3 * h, 8),  # FLUX.1's marker
                 "double_blocks.0.img_attn.qkv.weight": torch.zeros(3 * h, 8)})
    g = torch.Generator().manual_seed(0)
    r = 2
    for split in (False, True):
        n = 4 if split else 1
        down = torch.randn(n * r, 8, generator=g)
        up = torch.randn(3 * h + mlp, n * r, generator=g)
        if split:
            mask = torch.zeros_like(up)
            for j, (a, b) in enumerate(((0, h), (h, 2 * h), (2 * h, 3 * h), (3 * h, 3 * h + mlp))):
                mask[a:b, j * r:(j + 1) * r] = 1
            up = up * mask
        key = "lora_unet_single_blocks_0_linear1"
        path = tmp_path / f"l{split}.safetensors"
        write_lora(path, LoraFile("kohya", {key: LoraModule(key, down, up, alpha=3.0)}))
        lf = read_lora(path)
        sd = FluxPipeline.lora_state_dict(str(path))
        with open_model(model) as m:
            ours = deltas(lf, m)
        assert len(ours) == 4
        for module, dw in ours.items():
            d = module.partition(".")[2]
            theirs = sd[f"transformer.{d}.lora_B.weight"].double() @ sd[f"transformer.{d}.lora_A.weight"].double()
            assert torch.allclose(theirs, dw, rtol=1e-5, atol=1e-6 * float(dw.abs().max())), (split, module)
        # and the split parts are rank r, not n*r
        part = split_module(lf.modules[key], ((h, 2 * h),))
        assert part.rank == r and part.scale == pytest.approx(lf.modules[key].scale)


# ----------------------------------------------------------------------------- parts


def test_parts_split_and_assemble_exactly():
    g = torch.Generator().manual_seed(1)
    down = torch.randn(6, 5, generator=g).half()
    up = torch.zeros(9, 6).half()
    up[0:3, 0:2] = torch.randn(3, 2, generator=g).half()
    up[3:6, 2:4] = torch.randn(3, 2, generator=g).half()
    up[6:9, 4:6] = torch.randn(3, 2, generator=g).half()
    lm = LoraModule("k", down, up, alpha=3.0)
    parts = {part_key("k", ((a, b),), 9): split_module(lm, ((a, b),)) for a, b in ((3, 6), (0, 3), (6, 9))}
    assert all(p.rank == 2 and p.scale == lm.scale for p in parts.values())
    assert parse_part_key("k[3:6/9]") == ("k", ((3, 6),), 9) and parse_part_key("lora_unet_x") is None
    out = assemble_parts(parts)["k"]
    assert torch.equal(out.down, down) and torch.equal(out.up, up) and out.alpha == pytest.approx(3.0)
    # shared down (plain fused LoRA): assembled back without growing the rank
    full = LoraModule("k", down, torch.randn(9, 6, generator=g).half(), alpha=None)
    parts = {part_key("k", ((a, b),), 9): split_module(full, ((a, b),)) for a, b in ((0, 3), (3, 6), (6, 9))}
    out = assemble_parts(parts)["k"]
    assert out.down is down and torch.equal(out.up, full.up) and out.alpha is None
    # swapped halves
    sw = assemble_parts({part_key("m", ((2, 4), (0, 2)), 4): LoraModule("m", down[:1], torch.arange(4.).reshape(4, 1))})["m"]
    assert sw.up.flatten().tolist() == [2.0, 3.0, 0.0, 1.0]
    assert split_module(LoraModule("z", down, torch.zeros(9, 6)), ((0, 3),)) is None


def test_canonical_modules_match_layouts(pair):
    """kohya fused, kohya split_qkv and PEFT spellings of one LoRA land on the same canonical
    modules with the same dW (what `compare --base` needs across layouts)."""
    with open_model(pair["source"]) as m:
        kohya = read_lora(pair["loras"]["kohya"])
        canon = canonical_modules(kohya.modules, m)
        assert "transformer.single_transformer_blocks.0.proj_mlp" in canon and not any(k.startswith("lora_") for k in canon)
        want = deltas(kohya, m)
        assert set(canon) == set(want)
        for k, c in canon.items():
            assert torch.allclose(c.scale * c.up.double() @ c.down.double(), want[k]), k


# ----------------------------------------------------------------------------- transfers


@pytest.mark.parametrize("name", ["kohya", "kohya-split", "kohya-diffusers", "comfy", "xlabs", "peft"])
def test_copy_is_bit_exact(pair, tmp_path, name):
    out = tmp_path / "o.safetensors"
    prolora.transfer(pair["source"], pair["target"], pair["loras"][name], out, method="copy", cache=False)
    a, b = read_lora(pair["loras"][name]), read_lora(out)
    assert a.format == b.format and set(a.modules) == set(b.modules)
    for k, m in a.modules.items():
        o = b.modules[k]
        assert torch.equal(o.down, m.down) and o.alpha == m.alpha, k
        if k.startswith("lora_unet_final_layer_"):  # written with scale 1 (diffusers ignores its alpha)
            continue
        assert torch.equal(o.up, m.up), k


def test_fused_and_split_inputs_give_the_same_transfer(pair, tmp_path):
    """One LoRA as kohya fused modules, as kohya split_qkv and as separate PEFT modules: the
    transferred dW per canonical module is the same (per-slice bases), and each output keeps its
    input's layout: fused keys in block-diagonal split form, or separate modules."""
    src, tgt = pair["source"], pair["target"]
    kohya = read_lora(pair["loras"]["kohya"])
    with open_model(src) as sm:
        fused = {k: m for k, m in kohya.modules.items() if k.endswith(("_qkv", "_linear1"))}
        dws = deltas(LoraFile("kohya", fused), sm)
        peft_mods, split_mods = {}, {}
        for k, m in fused.items():
            fh = sm.resolve_fused(k)
            n, r = len(fh.slices), m.rank
            up = torch.zeros(m.up.shape[0], n * r, dtype=m.up.dtype)
            for j, s in enumerate(fh.slices):
                rows = torch.cat([m.up[a:b] for a, b in s.rows])
                peft_mods[s.module] = LoraModule(s.module, m.down, (rows.double() * m.scale).half())
                for a, b in s.rows:
                    up[a:b, j * r:(j + 1) * r] = m.up[a:b]
            split_mods[k] = LoraModule(k, m.down.repeat(n, 1), up, alpha=m.alpha * n)
    files = {"fused": LoraFile("kohya", fused), "split": LoraFile("kohya", split_mods), "peft": LoraFile("peft", peft_mods)}
    results = {}
    with open_model(tgt) as tm:
        for name, lf in files.items():
            write_lora(tmp_path / f"{name}.safetensors", lf)
            out = tmp_path / f"{name}_out.safetensors"
            rep = prolora.transfer(src, tgt, tmp_path / f"{name}.safetensors", out, cache=False).report
            assert rep.summary()["transferred"] == len(dws)
            o = read_lora(out)
            results[name] = deltas(o, tm)
            if name != "peft":
                qkv = o.modules["lora_unet_double_blocks_0_img_attn_qkv"]
                assert tuple(qkv.down.shape) == (12, H)  # three rank-4 slices, block-diagonal
                assert qkv.up[:H, 4:].abs().max() == 0 and qkv.up[2 * H:, :8].abs().max() == 0
                assert tuple(o.modules["lora_unet_single_blocks_0_linear1"].down.shape) == (16, H)
            else:
                assert set(o.modules) == set(peft_mods)
    for k, v in results["fused"].items():
        for other in ("split", "peft"):
            assert torch.allclose(results[other][k], v, rtol=2e-2, atol=2e-4 * float(v.abs().max())), (other, k)


def test_dev_to_schnell_drops_guidance_and_says_why(pair, tmp_path):
    out = tmp_path / "schnell.safetensors"
    res = prolora.transfer(pair["source"], pair["schnell"], pair["loras"]["kohya"], out, cache=False, tau=0.0)
    dropped = [r for r in res.report.layers if not r.transferred]
    assert {r.source_key for r in dropped} == {"lora_unet_guidance_in_in_layer", "lora_unet_guidance_in_out_layer"}
    for r in dropped:
        assert r.reason.startswith("no counterpart in the target model") and "guidance embedder" in r.reason
        assert "FLUX.1-schnell" in r.reason
    written = read_lora(out)
    assert not any("guidance" in k for k in written.modules)
    assert len(written.modules) == len(read_lora(pair["loras"]["kohya"]).modules) - 2


def test_format_conversions_and_refusals(pair, tmp_path):
    src, tgt = pair["source"], pair["target"]
    # kohya (with linear1) -> xlabs: the MLP rows of linear1 have no XLabs name and are reported; the
    # tiny model has no double block 18 / single block 37, which ComfyUI's XLabs reader requires: a warning
    res = prolora.transfer(src, tgt, pair["loras"]["kohya"], tmp_path / "x.safetensors", format="xlabs", cache=False)
    why = {r.module for r in res.report.layers if not r.transferred and "XLabs" in r.reason}
    assert "transformer.single_transformer_blocks.0.proj_mlp" in why
    assert read_lora(tmp_path / "x.safetensors").format == "xlabs"
    assert any("ComfyUI will read nothing" in w and "--format comfy" in w for w in res.report.warnings)
    # peft -> kohya: the slices meet again in fused BFL modules
    prolora.transfer(src, tgt, pair["loras"]["peft"], tmp_path / "k.safetensors", format="kohya", cache=False)
    k = read_lora(tmp_path / "k.safetensors")
    assert "lora_unet_single_blocks_2_linear1" in k.modules and not any("[" in n for n in k.modules)
    # diffusers-layout source, BFL target: kohya keys resolve through the diffusers model's BFL map
    res = prolora.transfer(tgt, src, pair["loras"]["kohya-split"], tmp_path / "r.safetensors", cache=False)
    assert res.report.summary()["skipped"] == 0
    assert set(read_lora(tmp_path / "r.safetensors").modules) == set(read_lora(pair["loras"]["kohya-split"]).modules)
    with pytest.raises(ModelError, match="old diffusers"):
        prolora.transfer(src, tgt, pair["loras"]["peft"], tmp_path / "d.safetensors", format="diffusers-old")


def test_xlabs_output_refused_for_unet_models(sd15_pair, tmp_path):
    with pytest.raises(ModelError, match="XLabs"):
        prolora.transfer(sd15_pair["source"], sd15_pair["target"], sd15_pair["kohya"], tmp_path / "o.safetensors",
                         format="xlabs")


def test_flux_lora_on_wrong_models(pair, sd15_pair, tmp_path):
    with pytest.raises(ModelError):  # Flux source, SD target
        prolora.transfer(pair["source"], sd15_pair["target"], pair["loras"]["kohya"], tmp_path / "o.safetensors")
    with pytest.raises(LoraMismatchError):  # a Flux LoRA on SD models
        prolora.transfer(sd15_pair["source"], sd15_pair["target"], pair["loras"]["kohya"], tmp_path / "o.safetensors")


def test_similarity_and_inspect(pair):
    rep = prolora.similarity(pair["source"], pair["target"], layers="single_transformer_blocks.0", cache=False).report
    names = {r.module for r in rep.layers}
    assert "transformer.single_transformer_blocks.0.proj_mlp" in names and all(r.phi_left > 0.5 for r in rep.layers)
    facts = prolora.inspect(pair["source"])
    assert facts["kind"] == "model" and facts["family"] == "flux" and facts["variant"] == "dev"
    assert prolora.inspect(pair["schnell"])["variant"] == "schnell"


# ----------------------------------------------------------------------------- the measurement


def _fused_transfer(B, A, Ws, Wt, k):
    """prolora-full with bases of the FUSED matrices (the alternative we measured against):
    (dW_t, phi_left of the fused bases)."""
    def basis(W):
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :k], Vh[:k].T

    def carry(X, Ua, Ub):  # (P_Ub P_Ua + Q_Ub Q_Ua) X
        par = Ua @ (Ua.T @ X)
        perp = X - par
        return Ub @ (Ub.T @ par) + perp - Ub @ (Ub.T @ perp)

    Us, Vs = basis(Ws)
    Ut, Vt = basis(Wt)
    return carry(B, Us, Ut) @ carry(A.T, Vs, Vt).T, float((Us.T @ Ut).norm() ** 2 / k)


def test_per_slice_bases_survive_a_function_preserving_rescale(tmp_path):
    """Flux's QK RMSNorm makes q and k rows scale-free: a target with q x2 and k x0.5 is the same
    model. Per-slice bases see the same subspaces (phi 1) and give dW back exactly; bases of the
    fused matrix see another matrix (phi drops, a q-only LoRA leaks into k and v). This is the
    measurement behind taking subspaces per slice (numbers in families/flux/model.py)."""
    d = tmp_path
    src = write_model(d / "s.safetensors", "flux-dev:tiny", layout="single-file", seed=7)
    from safetensors.torch import load_file

    sd = load_file(str(src))
    for i in range(2):
        w = sd[f"double_blocks.{i}.img_attn.qkv.weight"].clone()
        w[:H] *= 2
        w[H:2 * H] *= 0.5
        sd[f"double_blocks.{i}.img_attn.qkv.weight"] = w
    save(d / "t.safetensors", sd)
    g = torch.Generator().manual_seed(3)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    up = torch.zeros(3 * H, 4)
    up[:H] = torch.randn(H, 4, generator=g)  # a q-only LoRA
    lm = LoraModule(key, (torch.randn(4, H, generator=g) / 6).half(), up.half(), alpha=4.0)
    write_lora(d / "q.safetensors", LoraFile("kohya", {key: lm}))
    res = prolora.transfer(src, d / "t.safetensors", d / "q.safetensors", d / "o.safetensors", cache=False)
    (rec,) = [r for r in res.report.layers if r.transferred]
    assert rec.phi_left == pytest.approx(1.0, abs=1e-6) and rec.phi_right == pytest.approx(1.0, abs=1e-6)
    out = read_lora(d / "o.safetensors").modules[key]
    dw_in = lm.scale * lm.up.double() @ lm.down.double()
    dw_out = out.scale * out.up.double() @ out.down.double()
    assert float((dw_out - dw_in).norm() / dw_in.norm()) < 1e-3  # fp16 output
    assert out.up[H:].abs().max() == 0  # still q-only
    # the fused alternative on the same weights
    with open_model(src) as sm, open_model(d / "t.safetensors") as tm:
        Ws = sm._file(sm.weights["transformer.transformer_blocks.0.attn.to_q"].file).get(
            "double_blocks.0.img_attn.qkv.weight").double()
        Wt = tm._file(tm.weights["transformer.transformer_blocks.0.attn.to_q"].file).get(
            "double_blocks.0.img_attn.qkv.weight").double()
    k = rec.k
    dF, phi_fused = _fused_transfer(lm.up.double() * lm.scale, lm.down.double(), Ws, Wt, k)
    leak = float(dF[H:].norm() / dF.norm())
    assert phi_fused < 0.95 and leak > 0.05 and float((dF - dw_in).norm() / dw_in.norm()) > 0.1


# ----------------------------------------------------------------------------- what is not FLUX.1
# (FLUX.2 files and folders: tests/families/test_unsupported.py)


def test_a_partial_flux_file_is_refused_clearly(tmp_path):
    """A Flux file without its input layers is not a model."""
    path = tmp_path / "flux.safetensors"
    save(path, {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)})
    with pytest.raises(ModelError, match="Flux"):
        open_model(path)


def test_flux1_markers_are_required_and_enough(tmp_path):
    """A BFL file is FLUX.1 by its per-block modulation (or Chroma's approximator); a file with the
    attention but no marker is refused as a partial Flux file, never opened."""
    from prolora.families.flux.keys import is_flux_keys, partial_flux_key

    assert is_flux_keys(["img_in.weight", "double_blocks.0.img_mod.lin.weight"]) == ""
    assert is_flux_keys(["model.diffusion_model.distilled_guidance_layer.in_proj.weight"]) == "model.diffusion_model."
    assert is_flux_keys(["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]) is None
    assert is_flux_keys(["double_blocks.0.img_mod.lin.weight", "single_stream_modulation.lin.weight"]) is None
    assert partial_flux_key(["double_blocks.0.img_attn.qkv.weight"]) == "double_blocks.0.img_attn.qkv.weight"
    assert partial_flux_key(["double_blocks.0.img_attn.qkv.weight", "single_stream_modulation.lin.weight"]) is None


# ----------------------------------------------------------------------------- the full experiment
# `PYTHONPATH=python:tests python tests/families/test_flux.py [h]` reruns the measurement quoted in
# families/flux/model.py (h = 384: ~1 min on 2 cores; not part of the suite).


def fused_vs_slice_experiment(h: int = 384, r: int = 16) -> list[dict]:
    """Independent q, k, v (and mlp) slices with trained-like spectra; targets: per-slice fine-tune,
    fused fine-tune, function-preserving q x2 / k x0.5; LoRAs: fused (all rows) and q-only.
    prolora-full with energy:0.9 bases of the fused matrix vs of each slice; figures relative to
    ||dW_s||: deviation from copy, fused vs per-slice difference, leak of a q-only LoRA."""
    from prolora.method import KMode, RankSpec, transfer_layer
    from prolora.ops import Basis
    from prolora.synthetic import Perturbation, generator, perturb, spectral_weight

    kmode = KMode.parse("energy:0.9")

    def basis(W, k=None):
        ev, V = torch.linalg.eigh(W.T @ W)
        ev, V = ev.flip(0).clamp_min(0), V.flip(1)
        S = ev.sqrt()
        k = k or kmode.choose(W.shape[1], S, float((W ** 2).sum()))
        return Basis(W @ V[:, :k] / S[:k], S, V[:, :k], float((W ** 2).sum()))

    def xfer(B, A, Ws, Wt):
        bs = basis(Ws)
        res = transfer_layer(B, A, bs, basis(Wt, bs.k), method="prolora-full", tau=0.0, rank=RankSpec.parse("2r"),
                             r_in=B.shape[1])
        return res.up @ res.down, res.record

    rows_out = []
    for kind, names in (("qkv", ("q", "k", "v")), ("linear1", ("q", "k", "v", "mlp"))):
        sizes = [4 * h if n == "mlp" else h for n in names]
        offs = [0] + list(torch.tensor(sizes).cumsum(0).tolist())
        Ws = [spectral_weight((n, h), generator("src", kind, name, 0)).double() for n, name in zip(sizes, names)]
        targets = {
            "finetune-slice": [perturb(w.float(), f"{kind}.{n}", Perturbation(size=0.1)).double() for w, n in zip(Ws, names)],
            "finetune-fused": list(torch.split(perturb(torch.cat(Ws).float(), kind, Perturbation(size=0.1)).double(), sizes)),
            "qknorm-rescale": [w * {"q": 2.0, "k": 0.5}.get(n, 1.0) for w, n in zip(Ws, names)],
        }
        g = generator("lora", kind, 0)
        A = torch.randn(r, h, generator=g, dtype=torch.float64) / math.sqrt(h)
        B = torch.randn(offs[-1], r, generator=g, dtype=torch.float64)
        for tname, Wt in targets.items():
            for lora in ("fused", "q-only"):
                Bl = B.clone()
                if lora == "q-only":
                    Bl[offs[1]:] = 0
                dW = Bl @ A
                dF, rf = xfer(Bl, A, torch.cat(Ws), torch.cat(Wt))
                parts = []
                for i in range(len(names)):
                    Bi = Bl[offs[i]:offs[i + 1]]
                    parts.append(xfer(Bi, A, Ws[i], Wt[i])[0] if Bi.abs().max() > 0 else torch.zeros(sizes[i], h,
                                                                                                    dtype=torch.float64))
                dS = torch.cat(parts)
                n = dW.norm()
                rows_out.append({
                    "h": h, "weight": kind, "target": tname, "lora": lora, "k_fused": rf.k,
                    "phi_fused": (round(rf.phi_left, 3), round(rf.phi_right, 3)),
                    "dev_fused": round(float((dF - dW).norm() / n), 3), "dev_slice": round(float((dS - dW).norm() / n), 3),
                    "fused_vs_slice": round(float((dF - dS).norm() / n), 3),
                    "leak_fused": round(float(dF[offs[1]:].norm() / dF.norm()), 3) if lora == "q-only" else None,
                })
    return rows_out


if __name__ == "__main__":
    import sys

    torch.set_num_threads(2)
    for row in fused_vs_slice_experiment(int(sys.argv[1]) if len(sys.argv) > 1 else 384):
        print(row, flush=True)
