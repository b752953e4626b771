"""The plan: LoRA modules -> layer jobs, and the refusals it makes before any work."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from prolora.errors import LoraMismatchError  # noqa: E402
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
    assert "a flux LoRA (Flux block names)" in msg and "is sdxl" in msg and "\n" not in msg


def test_a_lora_of_the_right_family_plans_every_module(sdxl_pair):
    lora = read_lora(sdxl_pair["kohya"])
    with open_model(sdxl_pair["source"]) as src, open_model(sdxl_pair["target"]) as tgt:
        plan = build_plan(lora, src, tgt)
    assert len(plan.jobs) == len(lora.modules) and not plan.skipped
    assert {j.module for j in plan.jobs} == {src.resolve(k)[0] for k in lora.modules}
