"""The client test of extract / resize / merge: what diffusers itself does with the files.

Tiny REAL SDXL and SD1.5 models (zoo: diffusers UNet + transformers CLIP, random weights) are a
BASE, and BASE plus a fine-tune-like change a TUNED, both saved as diffusers folders. A
full-rank extraction (every layer's rank = min(m, n), so the approximation is exact) is loaded
with diffusers' own `load_lora_weights` on the BASE pipeline and fused (the check of
tests/client_sd.py: every module diffusers adapted holds base + the file's dW, nothing else changed, nothing
ignored), and the file's dW must be TUNED - BASE to 1e-5 relative (read independently from the two
folders). Resized and merged LoRAs load the same way. The Flux row uses the Flux client test's tiny
FluxTransformer2DModel pair (tests/client_flux.py).
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from client_flux import load_and_fuse as flux_load_and_fuse  # noqa: E402
from client_flux import write_models as write_flux_models  # noqa: E402
from client_sd import check_with_diffusers, perturbed, quiet  # noqa: E402
from zoo import build, load_state, save_pipeline, state  # noqa: E402

from prolora.families import open_model  # noqa: E402
from prolora.formats import read_lora  # noqa: E402
from prolora.formats.parts import canonical_modules  # noqa: E402
from prolora.jobs.extract import extract  # noqa: E402
from prolora.jobs.merge import merge  # noqa: E402
from prolora.jobs.resize import resize  # noqa: E402
from prolora.synthetic import write_lora as synth_lora  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FULL = 100_000  # a rank above every layer's min(m, n): the extraction is exact


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    quiet()
    root = tmp_path_factory.mktemp("client_jobs")
    out = {}
    for kind, seed in (("sdxl", 21), ("sd15", 22)):
        mods = build(kind, seed)
        base = save_pipeline(mods, root / kind / "base")
        tuned = save_pipeline(load_state(kind, perturbed(state(mods), seed=seed + 1)), root / kind / "tuned")
        # check_with_diffusers loads the LoRA onto entry["target"]: here the BASE
        out[kind] = {"kind": kind, "dir": root / kind, "target": base, "base": base, "tuned": tuned}
    return out


@pytest.fixture(scope="module")
def flux_models(tmp_path_factory):
    """The Flux client test's tiny FluxTransformer2DModel pair (client_flux.write_models)."""
    return write_flux_models(tmp_path_factory)


def _dense(m) -> torch.Tensor:
    return m.scale * (m.up.double().flatten(1) @ m.down.double().flatten(1))


@pytest.mark.parametrize("kind,fmt", [("sdxl", "kohya"), ("sdxl", "peft"), ("sd15", "kohya"), ("sd15", "peft")])
def test_full_rank_extraction_loads_in_diffusers_as_tuned_minus_base(pairs, tmp_path, kind, fmt):
    e = pairs[kind]
    out = tmp_path / f"{kind}-{fmt}.safetensors"
    res = extract(e["base"], e["tuned"], out, rank=FULL, conv_rank=FULL, text_encoders=True, format=fmt,
                  save_dtype=torch.float32)
    s = res.summary()
    assert s["extracted"] >= 40 and s["unspellable"] == 0, s
    got = check_with_diffusers(e, out)  # loads on BASE, fuses, nothing ignored, others untouched
    assert got["modules"] == s["extracted"]
    lf = read_lora(out)
    with open_model(e["base"]) as b, open_model(e["tuned"]) as t:
        for module, m in canonical_modules(lf.modules, b).items():
            D = (t.load(module, torch.float64) - b.load(module, torch.float64)).flatten(1)
            assert float((_dense(m) - D).norm() / D.norm()) < 1e-5, module


def test_low_rank_extraction_loads_in_diffusers(pairs, tmp_path):
    e = pairs["sdxl"]
    out = tmp_path / "r4.safetensors"
    extract(e["base"], e["tuned"], out, rank=4, text_encoders=True)
    got = check_with_diffusers(e, out)
    assert got["modules"] >= 40


def test_resized_and_merged_loras_load_in_diffusers(pairs, tmp_path):
    e = pairs["sdxl"]
    kohya = synth_lora(e["base"], tmp_path / "k.safetensors", format="kohya", rank=6, targets="transformer", seed=1)
    peft = synth_lora(e["base"], tmp_path / "p.safetensors", format="peft", rank=4, targets="transformer", seed=2)
    r = resize(kohya, tmp_path / "r.safetensors", "sv_fro:0.8")
    check_with_diffusers(e, r.output)
    m = merge([kohya, peft], tmp_path / "m.safetensors", [0.6, 0.4], rank=5, base=e["base"])
    check_with_diffusers(e, m.output)
    m = merge([kohya, peft], tmp_path / "mp.safetensors", [0.6, 0.4], base=e["base"], format="peft")
    check_with_diffusers(e, m.output)


@pytest.mark.parametrize("fmt,layers", [("peft", None), ("kohya", r"^transformer\.transformer_blocks\.\d+\.attn\.")])
def test_flux_extraction_loads_in_diffusers(flux_models, tmp_path, fmt, layers):
    """BASE: the diffusers folder, TUNED: the BFL single file (dW = source - target). kohya: the
    double blocks' attention (diffusers cannot load kohya linear1 at this width), q/k/v written
    as kohya's fused qkv (block-diagonal)."""
    out = tmp_path / f"flux-{fmt}.safetensors"
    res = extract(flux_models["target"], flux_models["source"], out, rank=FULL, format=fmt, layers=layers,
                  save_dtype=torch.float32)
    got = flux_load_and_fuse(flux_models["target"], out)
    assert not got["ignored"], sorted(got["ignored"])[:5]
    assert len(got["adapted"]) == res.summary()["extracted"]
    if fmt == "kohya":
        assert "lora_unet_double_blocks_0_img_attn_qkv" in read_lora(out).modules
