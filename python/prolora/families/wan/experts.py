"""The two experts of Wan 2.2 A14B (the family's `experts` hook).

A Wan 2.2 A14B diffusers folder holds two experts of Wan 2.1's 14B layout: `transformer/` is the
high-noise expert (WanPipeline runs it for timesteps >= boundary_ratio * num_train_timesteps) and
`transformer_2/` the low-noise one. `expert_targets` names them; a transfer to such a folder
writes one LoRA per expert (prolora.experts). ComfyUI distributes them as two single files
(`wan2.2_t2v_high_noise_14B_fp16.safetensors`, `..._low_noise_...`), each an ordinary Wan file,
given as TARGET (high noise) and --target-2 (low noise).
"""
from __future__ import annotations

import os
from pathlib import Path

from ...checkpoints.folders import class_name
from ...errors import OptionError
from .keys import CLASS

# expert label -> component folder of a Wan 2.2 A14B pipeline (WanPipeline: transformer runs the
# high-noise steps, transformer_2 the low-noise ones), in the order the experts run
EXPERTS = {"high_noise": "transformer", "low_noise": "transformer_2"}


def expert_targets(path) -> dict[str, Path] | None:
    """{"high_noise": path/transformer, "low_noise": path/transformer_2} for a Wan 2.2 A14B
    diffusers folder holding both experts, else None."""
    p = Path(path)
    if not p.is_dir():
        return None
    folders = {label: p / comp for label, comp in EXPERTS.items()}
    if all(class_name(f / "config.json") == CLASS for f in folders.values()):
        return folders
    return None


def expert_label(path) -> str | None:
    """"high_noise" / "low_noise" when a file or folder name says so (ComfyUI's split files), else None."""
    name = Path(path).name.lower().replace("-", "_")
    for label in EXPERTS:
        if label in name:
            return label
    return None


def experts_of(target: str | os.PathLike, target_2: str | os.PathLike | None = None) -> dict[str, Path] | None:
    """{expert label: model path} when `target` is a folder holding both Wan 2.2 experts, or when
    `target_2` is given (TARGET the high-noise expert, TARGET_2 the low-noise one; a file named for
    the other expert is refused); None for an ordinary target."""
    if target_2 is None:
        return expert_targets(target)
    if expert_targets(target) is not None:
        raise OptionError(f"{target} holds both Wan 2.2 experts already; give no second target")
    pair = {"high_noise": Path(target), "low_noise": Path(target_2)}
    for label, path in pair.items():
        named = expert_label(path)
        if named is not None and named != label:
            raise OptionError(f"{path} is named as the {named.replace('_', '-')} expert but was given as the "
                              f"{label.replace('_', '-')} one: TARGET is the high-noise expert, the second target "
                              "the low-noise expert")
    return pair


