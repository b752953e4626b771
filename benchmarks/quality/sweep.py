"""The candidates scored on each target, and the evaluation stage that scores them."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pipeline import Config

# the library's provisional defaults, the point every sweep varies one thing from
BASE = {"subspace": "energy:0.9", "tau": 0.8, "rank": "same", "skipped": "drop", "match": "auto"}
METHODS = {  # label -> options
    "copy": {"method": "copy"},
    "subspace": {"method": "subspace"},
    "prolora": {"method": "prolora", "rank": "same"},
    "prolora 2r": {"method": "prolora", "rank": "2r"},
    "prolora-full": {"method": "prolora-full"},
}
K_MODES = ("energy:0.8", "energy:0.9", "energy:0.95", "ratio:0.25", "ratio:0.5", "rank:8")
TAUS = (0.0, 0.8, 0.9, 0.95, 0.97, 0.99)


@dataclass
class Candidate:
    group: str  # main | k | tau | match
    label: str
    options: dict[str, Any] | None = None  # transfer options; None for no LoRA / an oracle
    oracle_seed: int | None = None
    samples: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def candidates(target: str) -> list[Candidate]:
    out = [Candidate("main", "no LoRA", samples=True)]
    out += [Candidate("main", label, {**BASE, **opts}, samples=True) for label, opts in METHODS.items()]
    out += [Candidate("main", "oracle, other seed", oracle_seed=1, samples=True),
            Candidate("main", "oracle", oracle_seed=0, samples=True)]
    projecting = {k: v for k, v in METHODS.items() if k != "copy"}
    for k in K_MODES:  # tau 0: every layer transferred, so only k matters
        out += [Candidate("k", label, {**BASE, **opts, "subspace": k, "tau": 0.0}, extra={"k": k})
                for label, opts in projecting.items()]
    for tau in TAUS:
        out += [Candidate("tau", label, {**BASE, **opts, "tau": tau}, extra={"tau": tau})
                for label, opts in projecting.items()]
        out += [Candidate("tau", f"{label}, skipped copy", {**BASE, **METHODS[label], "tau": tau, "skipped": "copy"},
                          extra={"tau": tau}) for label in ("prolora-full", "prolora 2r")]
    if target == "pruned":  # blocks matched by name instead of by similarity
        for label in ("copy", "prolora-full"):
            for match in ("name", "similarity"):
                out.append(Candidate("match", label, {**BASE, **METHODS[label], "tau": 0.0, "match": match},
                                     extra={"match": match}))
    return out


def evaluate_target(cache: Path, target: str, cfg: Config) -> None:
    """Score every candidate on `target`; write rows.json and samples.png into eval-<target>/."""
    import prolora
    from prolora.formats import read_lora

    from .evaluate import Scorer
    from .report import save_grid
    from .stages import load_classifiers

    out = cache / f"eval-{target}"
    src_unet, tgt_unet = cache / "source" / "unet", cache / target / "unet"
    lora = cache / "lora-source-0" / "lora.safetensors"
    oracles = {s: read_lora(cache / f"lora-{target}-{s}" / "lora.safetensors") for s in (0, 1)}
    scorer = Scorer(cache / target, oracles[0].modules, load_classifiers(cache), cfg.n_func, cfg.n_samples,
                    cfg.sample_steps)
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
    save_grid(out / "samples.png", grids)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
