"""Models of families prolora does not support (families/unsupported/) are refused by name, never
read as the nearest supported family; and FLUX.2, which shares FLUX.1's block names (double_blocks
/ transformer_blocks, 39 weight names at [klein] size) and "Flux" in its class name, is read as
FLUX.2 (families/flux2/) and never as FLUX.1: a FLUX.2 [klein] diffusers folder, its module in
memory and a BFL file of its keys are FLUX.2, and FLUX.1's own claims return None for each.
FLUX.3 (early_stream_modulations) stays refused by name, even beside FLUX.2's markers."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prolora.errors import ModelError  # noqa: E402
from prolora.families import open_model  # noqa: E402
from prolora.safetensors_io import save  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flux2(tmp_path_factory):
    """A tiny FLUX.2 [klein]-shaped transformer built by diffusers' own class, saved as a pipeline
    folder and held in memory."""
    diffusers = pytest.importorskip("diffusers")
    cls = getattr(diffusers, "Flux2Transformer2DModel", None)
    if cls is None:
        pytest.skip("this diffusers has no Flux2Transformer2DModel")
    torch.manual_seed(0)
    m = cls(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False).eval()
    d = tmp_path_factory.mktemp("flux2")
    m.save_pretrained(d / "pipe" / "transformer")
    (d / "pipe" / "model_index.json").write_text(json.dumps(
        {"_class_name": "Flux2KleinPipeline", "transformer": ["diffusers", "Flux2Transformer2DModel"]}))
    return {"pipe": d / "pipe", "module": m}


def test_a_flux2_folder_is_read_as_flux2_not_flux(flux2):
    from prolora import families

    flux = families.get("flux")
    for path in (flux2["pipe"], flux2["pipe"] / "transformer"):
        assert flux.claim_folder(path) is None
        with open_model(path) as m:
            assert m.family == "flux2" and families.of(m) is families.get("flux2")


def test_inspect_names_a_flux2_folder(flux2, capsys):
    from prolora.cli import main

    assert main(["inspect", str(flux2["pipe"])]) == 0
    out = capsys.readouterr().out
    assert "flux2" in out and "klein" in out, out


def test_a_flux2_module_is_read_as_flux2_not_flux(flux2):
    from prolora import families
    from prolora.checkpoints.memory import held

    m = flux2["module"]
    flux = families.get("flux")
    assert flux.claim_memory(held(m)) is None
    assert flux.claim_memory(held((m.state_dict(), dict(m.config)))) is None  # a config without _class_name
    for obj in (m, (m.state_dict(), {k: v for k, v in m.config.items() if not k.startswith("_")})):
        assert families.in_memory_model(obj).family == "flux2"


def test_a_flux2_bfl_file_is_read_as_flux2_not_flux(tmp_path):
    """BFL names: FLUX.2 has double_blocks / single_blocks too, with one shared modulation
    (double_stream_modulation_img / _txt, single_stream_modulation) instead of each block's img_mod."""
    from prolora import families
    from prolora.safetensors_io import read_header
    from prolora.synthetic import write_model

    for layout in ("single-file", "single-file-prefixed"):
        path = write_model(tmp_path / f"{layout}.safetensors", "flux2-klein-4b:tiny", layout=layout)
        assert families.get("flux").claim_file(path, read_header(path)) is None
        with open_model(path) as m:
            assert m.family == "flux2"


def test_a_partial_flux2_file_is_refused_as_not_whole(tmp_path):
    keys = ["img_in.weight", "txt_in.weight", "double_stream_modulation_img.lin.weight",
            "double_stream_modulation_txt.lin.weight", "single_stream_modulation.lin.weight",
            "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "single_blocks.0.linear2.weight"]
    path = tmp_path / "partial.safetensors"
    save(path, {k: torch.zeros(6, 2) for k in keys})
    with pytest.raises(ModelError, match="FLUX.2"):
        open_model(path)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_a_flux3_file_is_refused_by_name(tmp_path, prefix):
    """FLUX.3's early_stream_modulations tell it apart, even beside FLUX.2's shared modulation keys."""
    from prolora import families
    from prolora.safetensors_io import read_header

    keys = ["img_in.weight", "early_stream_modulations.image.lin.weight", "single_stream_modulation.lin.weight",
            "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]
    path = tmp_path / "flux3.safetensors"
    save(path, {prefix + k: torch.zeros(6, 2) for k in keys})
    for name in ("flux", "flux2"):
        assert families.get(name).claim_file(path, read_header(path)) is None
    with pytest.raises(ModelError) as e:
        open_model(path)
    assert "a FLUX.3 transformer" in str(e.value) and "not supported" in str(e.value)


def test_a_flux3_folder_is_refused_by_name(tmp_path):
    folder = tmp_path / "flux3"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "Flux3Transformer2DModel"}))
    with pytest.raises(ModelError, match=r"a FLUX\.3 transformer \(Flux3Transformer2DModel\): not supported"):
        open_model(folder)
