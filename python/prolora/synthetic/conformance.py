"""What a family's synthetic part tells the conformance suite (tests/families/test_conformance.py),
so that one generic test drives every registered family: the part defines
`CONFORMANCE = Conformance(...)` next to its presets and writers.

Per pair of `pairs`, the suite writes the source and a TARGET of it (the target's preset written
with the source as its base) in every layout of `layouts` (prolora.synthetic.write_model), reads
them as files, folders and modules held in memory (diffusers' own class of the member, from the
folder's `component`), writes every LoRA of `loras` (prolora.synthetic.write_lora) on the
source, reads each back, resolves it to canonical modules and writes it again, transfers it onto
the target, and loads the output with diffusers' own pipeline of the target's member holding the
target's denoiser. `loader_gaps` names what diffusers cannot load and why (the suite checks that it
still fails there and reports xfail with the reason; a gap diffusers closes shows as a failure).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Conformance:
    # (source preset, target preset), tiny "name:scale" presets: the target is written from the
    # source (same member, or a related member derived from it)
    pairs: tuple[tuple[str, str], ...]
    layouts: tuple[str, ...]  # write_model layouts the family's readers read, "diffusers" first
    # LoRA spelling, as trainers name it -> write_lora keyword arguments (format=..., spelling=..., ...)
    loras: dict[str, dict[str, Any]]
    component: str  # the denoiser's folder in a pipeline folder, and its pipeline argument ("unet", "transformer")
    model_classes: dict[str, str]  # member -> the denoiser's diffusers class ("UNet2DConditionModel", ...)
    pipelines: dict[str, str]  # member -> the diffusers pipeline whose load_lora_weights must take the outputs
    dtype: str = "float16"  # the torch dtype the models are written in
    # a LoRA spelling of `loras` -> why prolora reads its keys as another spelling's and writes
    # them back so (e.g. unprefixed PEFT keys written under the component's prefix)
    rewritten: dict[str, str] = field(default_factory=dict)
    # a LoRA spelling of `loras` ("<spelling>@<member>": on that member's pipeline only) -> why
    # diffusers' loader cannot take the transfer's output of it
    loader_gaps: dict[str, str] = field(default_factory=dict)
