"""One LoRA onto a target made of several experts (Wan 2.2 A14B: a high-noise and a low-noise
transformer of Wan 2.1's layout): one transfer per expert, one output and one report each.

The target is either a Wan 2.2 A14B diffusers folder holding both experts (transformer/ is the
high-noise one, transformer_2/ the low-noise one) or two models given separately, e.g. ComfyUI's
split files (`--target-2`: TARGET is then the high-noise expert and the second the low-noise one).
Which targets hold experts, and their labels, is the families' to say (`Family.experts`).

Output naming: OUT `style.safetensors` -> `style.high_noise.safetensors` and
`style.low_noise.safetensors` beside it; OUT an existing folder -> `<folder>/<LoRA stem>.<expert>.safetensors`.
Several LoRAs (a batch) go into the folder OUT the same way, each expert in one pass over its
model. Every output path is checked before any work, as for a single transfer.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OptionError, OutputPathError
from .families import families
from .options import TransferOptions
from .safetensors_io import atomic_path

PathLike = str | os.PathLike


@dataclass
class ExpertsResult:
    """A LoRA moved to every expert of a target: expert label -> its TransferResult (its own
    report and output), in the order the experts run (high-noise first)."""

    results: dict[str, Any]  # label -> api.TransferResult (one LoRA) or api.BatchResult (several)
    targets: dict[str, Path]


def experts_of(target: PathLike, target_2: PathLike | None = None) -> dict[str, Path] | None:
    """{expert label: model path} when a family's `experts` hook says `target` holds several
    experts (a Wan 2.2 A14B folder) or takes `target_2` as the second (TARGET high-noise, TARGET_2
    low-noise); None for an ordinary target."""
    if not isinstance(target, (str, os.PathLike)):
        return None  # a model held in memory (api.transfer) is one model
    for fam in families():
        if fam.experts is not None:
            found = fam.experts(target, target_2)
            if found is not None:
                return found
    if target_2 is not None:
        raise OptionError(f"a second target was given, but no model family splits {target} into experts")
    return None


def _labels() -> list[str]:
    """Every expert label a family knows (its loader's experts), in order."""
    return [label for fam in families() for label in fam.loader.experts]


def expert_outputs(output: PathLike, lora: PathLike, labels: list[str]) -> dict[str, Path]:
    """The output path of each expert (see the module doc for the naming)."""
    out = Path(output)
    if out.is_dir():
        stem = out / Path(lora).stem
    elif out.suffix.lower() == ".safetensors":
        stem = out.with_suffix("")
    else:
        raise OutputPathError(f"{out}: output must be a .safetensors file or an existing folder")
    return {label: stem.parent / f"{stem.name}.{label}.safetensors" for label in labels}


def transfer_experts(source: PathLike, experts: dict[str, PathLike], lora: PathLike, output: PathLike,
                     options: TransferOptions, *, report: PathLike | None = None, overwrite: bool = False,
                     progress=None) -> ExpertsResult:
    """Move `lora` (trained on `source`) onto each expert; write `<OUT>.<expert>.safetensors`
    per expert and, with `report`, one JSON whose `experts` section holds each expert's report."""
    from .outputs import resolve_output, resolve_report_path
    from .transfers import transfer

    known = _labels()
    unknown = set(experts) - set(known)
    if unknown:
        raise OptionError(f"unknown expert label(s) {sorted(unknown)}; expected {sorted(known)}")
    inputs = [source, *experts.values(), lora]
    outs = expert_outputs(output, lora, list(experts))
    for out in outs.values():
        resolve_output(out, lora, inputs, overwrite)
    if report:
        resolve_report_path(report, inputs)
    results = {label: transfer(source, path, lora, outs[label], options, overwrite=overwrite, progress=progress)
               for label, path in experts.items()}
    res = ExpertsResult(results, {k: Path(v) for k, v in experts.items()})
    if report:
        write_experts_json(report, {label: {"target": str(res.targets[label]), "output": str(r.output),
                                            **r.report.to_dict()} for label, r in results.items()})
    return res


def transfer_experts_many(source: PathLike, experts: dict[str, PathLike], loras: list[PathLike], output_dir: PathLike,
                          options: TransferOptions, *, report: PathLike | None = None, overwrite: bool = False,
                          progress=None, on_result=None) -> ExpertsResult:
    """Many LoRAs onto each expert: one pass over source and expert per expert (api's batch
    engine), `<output_dir>/<LoRA stem>.<expert>.safetensors` for each; a LoRA that fails is
    recorded in that expert's BatchResult.failures and the others go on. `report`: one JSON with
    a section per expert (its results and failures)."""
    from .outputs import resolve_output, resolve_report_path
    from .transfers import run_batch

    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = [source, *experts.values(), *loras]
    if report:
        resolve_report_path(report, inputs)
    stems = [Path(str(x)).stem for x in loras]
    dup = next((x for x in stems if stems.count(x) > 1), None)
    if dup is not None:
        raise OutputPathError(f"two LoRAs of the batch are named {dup}: their outputs would collide")
    results = {}
    for label, target in experts.items():
        def output_of(lora, label=label):
            return resolve_output(expert_outputs(out_dir, lora, [label])[label], lora, inputs, overwrite)

        results[label] = run_batch(source, target, loras, output_of, options, progress, on_result)
    res = ExpertsResult(results, {k: Path(v) for k, v in experts.items()})
    if report:
        write_experts_json(report, {label: {
            "target": str(res.targets[label]),
            "results": [{"lora": r.report.info.get("lora"), "output": str(r.output), **r.report.to_dict()}
                        for r in b.results],
            "failures": [{"lora": f.lora, "error": f.error} for f in b.failures]} for label, b in results.items()})
    return res


def similarity_experts(source: PathLike, experts: dict[str, PathLike], *, json_path: PathLike | None = None,
                       **kwargs: Any) -> dict[str, Any]:
    """api.similarity of `source` against each expert: {label: SimilarityResult}; with
    `json_path`, one JSON whose `experts` section holds each expert's report."""
    from .outputs import resolve_report_path
    from .subspaces import similarity

    if json_path:
        resolve_report_path(json_path, [source, *experts.values()])
    out = {label: similarity(source, path, **kwargs) for label, path in experts.items()}
    if json_path:
        write_experts_json(json_path, {label: {"target": str(experts[label]), **r.report.to_dict()}
                                       for label, r in out.items()})
    return out


def write_experts_json(path: PathLike, sections: dict[str, dict]) -> None:
    """One JSON, `{"experts": {label: section}}`, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"experts": sections}, indent=2) + "\n")
