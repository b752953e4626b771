"""Synthetic models: exact diffusers/transformers parameter lists, realistic spectra, determinism,
targets, LoRAs, and that everything opens with the base-model reader."""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest
import torch

from prolora.families import open_model
from prolora.safetensors_io import SafetensorsFile
from prolora.synthetic import (
    PRESETS, Perturbation, clip_params, flux_config, flux_params, generator, lora_targets, make_demo, model_params, preset, spectral_weight,
    unet_params, write_lora, write_model,
)
from zoo import canon

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAMILY = {"sd15": "sd1", "sd2": "sd2", "sdxl": "sdxl", "ssd-1b": "ssd-1b"}


def spectral_stats(w: torch.Tensor) -> tuple[float, float]:
    """(sigma_1 / sigma_{d/4}, fraction of directions holding 90% of sigma^2)."""
    s = torch.linalg.svdvals(w.reshape(w.shape[0], -1).double())
    d = s.numel()
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    return (s[0] / s[d // 4]).item(), (int(torch.searchsorted(energy, 0.9)) + 1) / d


def _phi(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    ua = torch.linalg.svd(a.double(), full_matrices=False)[0][:, :k]
    ub = torch.linalg.svd(b.double(), full_matrices=False)[0][:, :k]
    return ((ua.T @ ub) ** 2).sum().item() / k


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
            h.update(f.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------ parameter lists vs diffusers


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("scale", ["tiny", "small", "full"])
def test_params_equal_diffusers_and_transformers(name, scale):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    cfg = preset(name, scale)
    with torch.device("meta"):  # full-size models without allocating their weights
        unet = diffusers.UNet2DConditionModel(**cfg.unet)
    assert unet_params(cfg.unet) == [(k, tuple(v.shape)) for k, v in unet.state_dict().items()]
    for te in cfg.text_encoders.values():
        conf = transformers.CLIPTextConfig(
            hidden_size=te.hidden, intermediate_size=te.intermediate, num_attention_heads=te.heads,
            num_hidden_layers=te.layers, vocab_size=te.vocab, max_position_embeddings=te.max_positions,
            projection_dim=te.projection or te.hidden)
        cls = transformers.CLIPTextModelWithProjection if te.projection else transformers.CLIPTextModel
        with torch.device("meta"):
            model = cls(conf)
        assert clip_params(te) == [(canon(k), tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("scale", ["tiny", "small", "full"])
def test_chroma_params_equal_diffusers(scale, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    cfg = flux_config("chroma", scale)
    args = {k: v for k, v in cfg.diffusers_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        model = getattr(diffusers, cfg.diffusers_config()["_class_name"])(**args)
    assert flux_params(cfg) == [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    if scale == "tiny":  # derived from a schnell base: shared weights perturbed, the approximator new
        src = write_model(tmp_path / "s.safetensors", "flux-schnell:tiny", layout="single-file")
        tgt = write_model(tmp_path / "t.safetensors", cfg, layout="single-file", base=src)
        with open_model(src) as s, open_model(tgt) as t:
            assert t.family == "chroma"
            shared = set(s.weights) & set(t.weights)
            assert shared and all(x.startswith("transformer.") for x in set(t.weights) - shared)
            q = "transformer.transformer_blocks.0.attn.to_q"
            assert 0.05 < float((t.load(q) - s.load(q)).norm() / s.load(q).norm()) < 0.2


def test_full_sizes_match_the_real_models():
    count = lambda cfg: sum(math.prod(s) for _, s in unet_params(cfg.unet))  # noqa: E731
    assert count(PRESETS["sd15"]) == 859_520_964
    assert count(PRESETS["sdxl"]) == 2_567_463_684
    assert count(PRESETS["ssd-1b"]) == 1_331_334_404
    blocks = lambda cfg: len({n.split(".transformer_blocks.")[0] + n.split(".transformer_blocks.")[1].split(".")[0]  # noqa: E731
                              for n, _ in unet_params(cfg.unet) if ".transformer_blocks." in n})
    assert blocks(PRESETS["sdxl"]) == 70 and blocks(PRESETS["ssd-1b"]) == 34


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_params(dict(PRESETS["sd15"].unet, class_embed_type="timestep"))
    with pytest.raises(ValueError):
        preset("flux")
    with pytest.raises(ValueError):
        preset("sdxl", "huge")


# ------------------------------------------------------------------ spectra


@pytest.mark.parametrize("shape", [(320, 320), (640, 2048), (1280, 320), (256, 128, 3, 3), (64, 64, 1, 1), (40, 96)])
def test_spectra_like_trained_weights(shape):
    for i in range(3):
        w = spectral_weight(shape, generator("t", shape, i))
        ratio, frac = spectral_stats(w)
        assert 2.5 <= ratio <= 3.5, (shape, ratio)
        assert 0.4 <= frac <= 0.6, (shape, frac)
        n = math.prod(shape[1:])
        assert abs(w.pow(2).mean().sqrt().item() * math.sqrt(n) - 1) < 1e-3  # RMS 1/sqrt(fan_in)


def test_spectra_survive_fp16_files(tmp_path):
    path = write_model(tmp_path / "m.safetensors", "sd15:small", layout="single-file", seed=3)
    with open_model(path) as m:
        names = [n for n, r in m.weights.items() if min(r.shape[0], math.prod(r.shape[1:])) >= 64]
        for name in names[:: max(1, len(names) // 12)]:
            ratio, frac = spectral_stats(m.load(name))
            assert 2.5 <= ratio <= 3.5 and 0.4 <= frac <= 0.6, (name, ratio, frac)


# ------------------------------------------------------------------ files, determinism


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("layout", ["diffusers", "single-file"])
def test_written_models_open_with_expected_family_and_weights(tmp_path, name, layout):
    cfg = preset(name, "tiny")
    path = write_model(tmp_path / ("m.safetensors" if layout == "single-file" else "m"), cfg, layout=layout)
    expected = {}
    for comp, plist in model_params(cfg).items():
        for n, s in plist:
            if n.endswith(".weight") and len(s) in (2, 4) and ".embeddings." not in n:
                expected[f"{comp}.{n[:-7]}"] = s
    if name == "sd2":  # SD2's encoder has no projection, OpenCLIP file or not
        assert "text_encoder.text_projection" not in expected
    with open_model(path) as m:
        assert m.family == FAMILY[name]
        assert m.layout == layout
        assert {k: r.shape for k, r in m.weights.items()} == expected
        assert {r.dtype for r in m.weights.values()} == {"F16"}


def test_deterministic_bytes(tmp_path):
    for layout in ("diffusers", "single-file"):
        a = write_model(tmp_path / f"a-{layout}", "ssd-1b:tiny", layout=layout, seed=7)
        b = write_model(tmp_path / f"b-{layout}", "ssd-1b:tiny", layout=layout, seed=7)
        c = write_model(tmp_path / f"c-{layout}", "ssd-1b:tiny", layout=layout, seed=8)
        assert _digest(a) == _digest(b) != _digest(c)
    assert open_model(tmp_path / "a-single-file").identity() != open_model(tmp_path / "c-single-file").identity()


def test_single_file_matches_diffusers_folder_and_diffusers_loader(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    folder = write_model(tmp_path / "folder", "sdxl:tiny", dtype=torch.float32, seed=5)
    single = write_model(tmp_path / "single.safetensors", "sdxl:tiny", layout="single-file", dtype=torch.float32, seed=5)
    with open_model(folder) as f, open_model(single) as s:
        for module in f.weights:
            assert torch.equal(f.load(module), s.load(module)), module
    unet = diffusers.UNet2DConditionModel.from_single_file(str(single), config=str(folder / "unet"), local_files_only=True)
    with SafetensorsFile(folder / "unet" / "diffusion_pytorch_model.safetensors") as ref:
        for k, v in unet.state_dict().items():
            assert torch.equal(v, ref.get(k)), k


# ------------------------------------------------------------------ targets


def test_target_is_source_plus_perturbation(tmp_path):
    src = write_model(tmp_path / "src.safetensors", "sdxl:tiny", layout="single-file", seed=0)
    tgt = write_model(tmp_path / "tgt", "sdxl:tiny", layout="diffusers", seed=0, base=src)
    with open_model(src) as s, open_model(tgt) as t:
        assert s.family == t.family == "sdxl" and set(s.weights) == set(t.weights)
        assert s.identity() != t.identity()
        rels, phis = [], []
        names = [n for n in s.weights if ".attentions." in n or "self_attn" in n or "mlp" in n]
        for n in names[:: max(1, len(names) // 20)]:
            ws, wt = s.load(n), t.load(n)
            rels.append(((wt - ws).norm() / ws.norm()).item())
            m2 = ws.reshape(ws.shape[0], -1)
            phis.append(_phi(m2, wt.reshape(wt.shape[0], -1), min(m2.shape) // 2))
        assert all(0.09 < r < 0.11 for r in rels), rels  # default size 0.1
        assert all(0.85 <= p <= 0.995 for p in phis), phis
        # spectra stay realistic in the target
        ratio, frac = spectral_stats(t.load(names[0]))
        assert 2.3 <= ratio <= 3.7 and 0.38 <= frac <= 0.62
    # non-weight parameters are the source's
    with SafetensorsFile(src) as fs, SafetensorsFile(tgt / "unet" / "diffusion_pytorch_model.safetensors") as ft:
        assert torch.equal(fs.get("model.diffusion_model.out.0.bias"), ft.get("conv_norm_out.bias"))


def test_target_sizes_follow_perturbation(tmp_path):
    src = write_model(tmp_path / "src", "sd15:tiny", dtype=torch.float32)
    for size in (0.02, 0.1):
        tgt = write_model(tmp_path / f"t{size}", "sd15:tiny", dtype=torch.float32, base=src,
                          perturbation=Perturbation(size=size, seed=3))
        with open_model(src) as s, open_model(tgt) as t:
            for n in list(s.weights)[::25]:
                ws, wt = s.load(n), t.load(n)
                assert abs(((wt - ws).norm() / ws.norm()).item() - size) < 1e-3 * size + 1e-5


def test_target_requires_matching_base(tmp_path):
    src = write_model(tmp_path / "src", "sd15:tiny")
    with pytest.raises(ValueError, match="does not match"):
        write_model(tmp_path / "tgt", "sdxl:tiny", base=src)
    assert not (tmp_path / "tgt" / "unet" / "diffusion_pytorch_model.safetensors").exists()


# ------------------------------------------------------------------ LoRAs and the demo


@pytest.mark.parametrize("fmt", ["kohya", "peft", "comfy", "diffusers-old"])
def test_write_lora_resolves_on_the_model(tmp_path, fmt):
    from prolora.formats import read_lora

    src = write_model(tmp_path / "src.safetensors", "sdxl:tiny", layout="single-file")
    path = write_lora(src, tmp_path / "lora.safetensors", format=fmt, rank=4, targets="transformer", seed=1)
    lora = read_lora(path)
    assert lora.format == fmt
    spelling = {"kohya": "kohya-ldm", "comfy": "comfy"}.get(fmt, "peft")
    with open_model(src) as m:
        want = set(lora_targets(m.weights, "transformer"))
        got = {}
        for key, mod in lora.modules.items():
            hit = m.resolve(key)
            assert hit is not None and hit[1] == spelling, key
            got[hit[0]] = mod
            assert mod.rank == 4
            if fmt == "kohya":  # the others fold alpha/r into up (peft: alpha = rank, as ComfyUI ignores the metadata)
                assert mod.scale == pytest.approx(0.5)
        assert set(got) == want
        for module, mod in list(got.items())[:10]:
            delta = mod.scale * mod.up.float().reshape(mod.out_features, -1) @ mod.down.float().reshape(4, -1)
            assert delta.norm().item() == pytest.approx(0.05 * math.sqrt(mod.out_features), rel=0.02)


def test_lora_targets():
    cfg = preset("sd15", "tiny")
    with_shapes = {}
    for comp, plist in model_params(cfg).items():
        for n, s in plist:
            if n.endswith(".weight") and len(s) in (2, 4) and ".embeddings." not in n:
                with_shapes[f"{comp}.{n[:-7]}"] = type("R", (), {"shape": s})()
    attn = set(lora_targets(with_shapes, "attn"))
    tr = set(lora_targets(with_shapes, "transformer"))
    al = set(lora_targets(with_shapes, "all"))
    alc = set(lora_targets(with_shapes, "all", conv=True))
    assert attn < tr < al < alc
    assert all(".attn" in m or "self_attn" in m for m in attn)
    assert "unet.down_blocks.0.attentions.0.proj_in" in tr  # 1x1 conv in SD1
    assert "unet.down_blocks.0.resnets.0.conv1" in alc and "unet.down_blocks.0.resnets.0.conv1" not in al
    assert "unet.down_blocks.0.resnets.0.time_emb_proj" in al
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc1" in tr


def test_make_demo(tmp_path):
    paths = make_demo(tmp_path)
    with open_model(paths["source"]) as s, open_model(paths["target"]) as t:
        assert s.layout == "single-file" and t.layout == "diffusers"
        assert s.family == t.family == "sdxl"
        assert s.identity() != t.identity()
    again = make_demo(tmp_path / "again")
    for k in ("source", "target", "lora"):
        assert _digest(Path(paths[k])) == _digest(Path(again[k]))
