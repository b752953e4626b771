"""What each pipeline stage does (run in a worker process by pipeline._worker): train the source,
the classifiers, the targets and the LoRAs, and score every candidate on each target."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import prolora
from prolora.formats import read_lora, write_lora
from prolora.lora import LoraFile, LoraModule

from . import train
from .config import Config
from .data import CLASSES
from .evaluate import Scorer
from .figures import save_grid
from .models import load_model, save_model
from .sweep import candidates
from .train import Classifier


def run(name: str, cache: Path, cfg: Config) -> dict[str, Any] | None:
    """Build stage `name` into cache/name from its inputs' folders; returns what stage.json records."""
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
        save_lora(out / "lora.safetensors", lora, cfg.lora_rank)
        return {"loss": log}
    if name == "eval-source":
        evaluate_source(cache, cfg)
        return None
    if name.startswith("eval-"):
        evaluate_target(cache, name.removeprefix("eval-"), cfg)
        return None
    raise ValueError(f"unknown stage {name}")


def save_lora(path: Path, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> None:
    """A diffusers/PEFT LoRA file (`unet.<module>.lora_A/B.weight`), written by prolora's writer."""
    mods = {f"unet.{k}": LoraModule(f"unet.{k}", down.float(), up.float(), float(rank)) for k, (down, up) in lora.items()}
    write_lora(path, LoraFile("peft", mods, {}, torch.float32), "peft")


def load_classifiers(cache: Path) -> tuple[Classifier, Classifier]:
    """The content and style classifiers of the `classifiers` stage, in eval mode."""
    content, style = Classifier(len(CLASSES)), Classifier(2)
    content.load_state_dict(load_file(str(cache / "classifiers" / "content.safetensors")))
    style.load_state_dict(load_file(str(cache / "classifiers" / "style.safetensors")))
    return content.eval(), style.eval()


def _scorer(cache: Path, model: str, oracle: dict, cfg: Config) -> Scorer:
    return Scorer(cache / model, oracle, load_classifiers(cache), cfg.n_func, cfg.n_samples, cfg.sample_steps)


def _write_rows(out: Path, rows: list[dict[str, Any]], grids: list[tuple[str, torch.Tensor]]) -> None:
    """What an evaluation stage leaves: samples.png (the grids) and rows.json (the tables' input)."""
    save_grid(out / "samples.png", grids)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))


def evaluate_source(cache: Path, cfg: Config) -> None:
    """Sanity check: the source LoRA on the source model, against no LoRA (eval-source/)."""
    lora = read_lora(cache / "lora-source-0" / "lora.safetensors").modules
    sc = _scorer(cache, "source", lora, cfg)
    rows, grids = [], []
    for label, mods in (("no LoRA", None), ("source LoRA", lora)):
        s, imgs = sc.score(mods, with_samples=True)
        rows.append({"group": "main", "label": label, "scores": s.__dict__})
        grids.append((label, imgs))
    _write_rows(cache / "eval-source", rows, grids)


def evaluate_target(cache: Path, target: str, cfg: Config) -> None:
    """Score every candidate on `target`; write rows.json and samples.png into eval-<target>/."""
    src_unet, tgt_unet = cache / "source" / "unet", cache / target / "unet"
    lora = cache / "lora-source-0" / "lora.safetensors"
    oracles = {s: read_lora(cache / f"lora-{target}-{s}" / "lora.safetensors") for s in (0, 1)}
    scorer = _scorer(cache, target, oracles[0].modules, cfg)
    bases = cache / "prolora-bases"
    rows, grids = [], []
    for cand in candidates(target):
        t0 = time.perf_counter()
        row: dict[str, Any] = {"group": cand.group, "label": cand.label, "options": cand.options, **cand.extra}
        lf = None
        if cand.oracle_seed is not None:
            lf = oracles[cand.oracle_seed]
        elif cand.options is not None:
            res = prolora.transfer(src_unet, tgt_unet, lora, cache=True, cache_dir=str(bases), **cand.options)
            lf = res.lora
            s = res.report.summary()
            row.update(layers=s["layers"], transferred=s["transferred"], min_phi=s["min_phi"],
                       mean_phi=(s["mean_phi_left"] + s["mean_phi_right"]) / 2 if s["mean_phi_left"] is not None else None,
                       k_min=s["k_min"], k_max=s["k_max"], retained=s["mean_retained_energy"])
            if res.report.info.get("matching"):
                row["matching"] = res.report.info["matching"]
        modules = lf.modules if lf is not None and lf.modules else None
        scores, imgs = scorer.score(modules, cand.samples)
        if modules:
            agreement = prolora.compare(lf, oracles[0], base=tgt_unet).agreement.summary()
            scores.cosine, scores.rel_error = agreement["cosine"], agreement["rel_error"]
        elif cand.options is not None or cand.oracle_seed is None:
            scores.cosine, scores.rel_error = 0.0, 1.0  # no dW at all
        row["scores"] = scores.__dict__
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        if imgs is not None:
            grids.append((cand.label, imgs))
    _write_rows(cache / f"eval-{target}", rows, grids)
