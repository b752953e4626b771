"""The plan: LoRA modules -> layer jobs, and the refusals it makes before any work: a LoRA of another
family, a pair of models of two families; modules the source lacks are skipped and reported."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from faults import K0, cli, files_in, lora_with, one_line_error  # noqa: E402

import prolora  # noqa: E402
from prolora.errors import LoraMismatchError, ModelError  # noqa: E402
from prolora.families import open_model  # noqa: E402
from prolora.formats import read_lora  # noqa: E402
from prolora.plan import build_plan  # noqa: E402
from prolora.synthetic import write_lora, write_model  # noqa: E402


def test_a_lora_of_another_family_is_refused_naming_both(sdxl_pair, tmp_path):
    flux = write_model(tmp_path / "flux.safetensors", "flux-dev:tiny", layout="single-file", seed=0)
    lora = read_lora(write_lora(flux, tmp_path / "flux_lora.safetensors", format="kohya", rank=4))
    with open_model(sdxl_pair["source"]) as src, open_model(sdxl_pair["target"]) as tgt:
        with pytest.raises(LoraMismatchError) as e:
            build_plan(lora, src, tgt)
    msg = str(e.value)
    assert "a flux LoRA (metadata ss_base_model_version=flux1)" in msg and "is sdxl" in msg and "\n" not in msg


def test_a_lora_of_the_right_family_plans_every_module(sdxl_pair):
    lora = read_lora(sdxl_pair["kohya"])
    with open_model(sdxl_pair["source"]) as src, open_model(sdxl_pair["target"]) as tgt:
        plan = build_plan(lora, src, tgt)
    assert len(plan.jobs) == len(lora.modules) and not plan.skipped
    assert {j.module for j in plan.jobs} == {src.resolve(k)[0] for k in lora.modules}


def test_wrong_family_lora_and_models(sdxl_pair, sd15_pair, tmp_path):
    with pytest.raises(LoraMismatchError, match="another model"):
        prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], sd15_pair["kohya"], tmp_path / "x.safetensors")
    with pytest.raises(ModelError, match="cross-family"):
        prolora.transfer(sdxl_pair["source"], sd15_pair["target"], sdxl_pair["kohya"], tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- through the command line


def test_some_keys_matching_nothing_are_skipped_and_reported(small, tmp_path, capsys):
    """Under half of the modules unknown to the source: those are skipped with a reason."""
    def rename_one(t):
        for role in ("lora_down.weight", "lora_up.weight", "alpha"):
            t[f"lora_unet_nowhere_0.{role}"] = t.pop(f"{K0}.{role}")

    lora = lora_with(small, tmp_path / "partly.safetensors", rename_one)
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    code, _, err = cli(capsys, "transfer", small["source"], small["target"], lora, "-o", out, "--report", rep,
                       "--no-cache", "-q")
    assert code == 0, err
    layers = json.loads(rep.read_text())["layers"]
    skipped = [r for r in layers if r["source_key"] == "lora_unet_nowhere_0"]
    assert len(layers) == 12 and skipped and skipped[0]["reason"] == "no such module in the source model"
    assert "lora_unet_nowhere_0" not in read_lora(out).modules


def test_lora_for_another_family(sdxl_pair, sd15_pair, tmp_path, capsys):
    """An SDXL LoRA given with an SD1.5 pair (the reverse case is in tests/cli/test_cli.py)."""
    code, _, err = cli(capsys, "transfer", sd15_pair["source"], sd15_pair["target"], sdxl_pair["kohya"], "-o",
                       tmp_path / "o.safetensors", "--no-cache")
    assert code == 2
    one_line_error(err, str(sdxl_pair["kohya"]), "a sdxl LoRA (second text encoder)", "source model source is sd1")
    assert files_in(tmp_path) == []


def test_sd15_given_where_sdxl_expected(small, sd15_pair, tmp_path, capsys):
    """An SD1.5 checkpoint passed as the target of an SDXL transfer."""
    code, _, err = cli(capsys, "transfer", small["source"], sd15_pair["target"], small["lora"], "-o",
                       tmp_path / "o.safetensors", "--no-cache")
    assert code == 2
    one_line_error(err, "is sdxl but target", "is sd1", "cross-family transfer is not supported")
    assert not (tmp_path / "o.safetensors").exists()
