"""What each pipeline stage does (run in a worker process by pipeline._worker)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .pipeline import Config


def _save_lora(path: Path, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> None:
    """A diffusers/PEFT LoRA file (`unet.<module>.lora_A/B.weight`), written by prolora's writer."""
    from prolora.formats import write_lora
    from prolora.lora import LoraFile, LoraModule

    mods = {f"unet.{k}": LoraModule(f"unet.{k}", down.float(), up.float(), float(rank)) for k, (down, up) in lora.items()}
    write_lora(path, LoraFile("peft", mods, {}, torch.float32), "peft")


def load_classifiers(cache: Path):
    from .data import CLASSES
    from .train import Classifier

    content, style = Classifier(len(CLASSES)), Classifier(2)
    content.load_state_dict(load_file(str(cache / "classifiers" / "content.safetensors")))
    style.load_state_dict(load_file(str(cache / "classifiers" / "style.safetensors")))
    return content.eval(), style.eval()


def run(name: str, cache: Path, cfg: Config) -> dict[str, Any] | None:
    from . import train
    from .models import load_model, save_model

    out = cache / name
    if name == "source":
        model, log = train.train_source(cfg.source_steps)
        save_model(model, out)
        return {"loss": log}
    if name == "classifiers":
        content, style, acc = train.train_classifiers(cfg.classifier_steps)
        save_file(content.state_dict(), str(out / "content.safetensors"))
        save_file(style.state_dict(), str(out / "style.safetensors"))
        return {"held_out_accuracy": acc}
    if name in ("finetune", "finetune-mix"):
        model, log = train.finetune(load_model(cache / "source"), cfg.finetune_steps, mix=name == "finetune-mix")
        save_model(model, out)
        return {"loss": log}
    if name == "pruned":
        model, log = train.distill(load_model(cache / "source"), cfg.distill_steps)
        save_model(model, out)
        return {"loss": log}
    if name.startswith("lora-"):
        base, seed = name.removeprefix("lora-").rsplit("-", 1)
        lora, log = train.train_lora(load_model(cache / base), cfg.lora_steps, int(seed), cfg.lora_rank)
        _save_lora(out / "lora.safetensors", lora, cfg.lora_rank)
        return {"loss": log}
    if name == "eval-source":
        from .report import save_grid
        from .evaluate import Scorer
        from prolora.formats import read_lora

        lora = read_lora(out.parent / "lora-source-0" / "lora.safetensors").modules
        sc = Scorer(cache / "source", lora, load_classifiers(cache), cfg.n_func, cfg.n_samples, cfg.sample_steps)
        rows, grids = [], []
        for label, mods in (("no LoRA", None), ("source LoRA", lora)):
            s, imgs = sc.score(mods, with_samples=True)
            rows.append({"group": "main", "label": label, "scores": s.__dict__})
            grids.append((label, imgs))
        save_grid(out / "samples.png", grids)
        (out / "rows.json").write_text(json.dumps(rows, indent=1))
        return None
    if name.startswith("eval-"):
        from .sweep import evaluate_target

        evaluate_target(cache, name.removeprefix("eval-"), cfg)
        return None
    raise ValueError(f"unknown stage {name}")
