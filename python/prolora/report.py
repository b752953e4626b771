"""Per-layer records of a transfer or similarity run, and their summary, table and JSON forms."""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .safetensors_io import atomic_path


@dataclass
class LayerRecord:
    """What happened to one LoRA module (or, for similarity, one weight): the one record of a
    layer's outcome. The layer math (method.py) fills in the verdict and the figures that decided
    it; the engine adds where the layer is (module, keys, shape, ranks) and its time."""

    module: str | None = None
    source_key: str = ""
    target_key: str | None = None
    shape: tuple[int, ...] | None = None
    transferred: bool = False
    reason: str = ""
    k: int | None = None
    phi_left: float | None = None
    phi_right: float | None = None
    phi_null_left: float | None = None
    phi_null_right: float | None = None
    gap: float | None = None
    rank_in: int | None = None
    rank_out: int | None = None
    retained_energy: float | None = None
    seconds: float = 0.0
    # for adapters that are not a plain LoRA (formats.adapters): the kind read and the relative
    # Frobenius error of the LoRA it was written as (rank_in is that LoRA's rank)
    adapter: str | None = None
    compression_error: float | None = None


_OPTIONAL = ("adapter", "compression_error")  # left out of a report's JSON when unset (plain LoRA)


def _record_dict(r: LayerRecord) -> dict[str, Any]:
    return {k: v for k, v in asdict(r).items() if not (k in _OPTIONAL and v is None)}


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


@dataclass
class Report:
    layers: list[LayerRecord]
    info: dict[str, Any] = field(default_factory=dict)  # method, options, models, timings
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        done = [r for r in self.layers if r.transferred]
        reasons = Counter(_reason_class(r.reason) for r in self.layers if not r.transferred)
        ks = [r.k for r in self.layers if r.k is not None]
        ret = [r.retained_energy for r in done if r.retained_energy is not None]
        return {
            "layers": len(self.layers),
            "transferred": len(done),
            "skipped": len(self.layers) - len(done),
            "skipped_by_reason": dict(reasons),
            "mean_phi_left": _mean([r.phi_left for r in self.layers]),
            "mean_phi_right": _mean([r.phi_right for r in self.layers]),
            "min_phi": min((min(r.phi_left, r.phi_right) for r in self.layers
                            if r.phi_left is not None and r.phi_right is not None), default=None),
            "k_min": min(ks, default=None),
            "k_max": max(ks, default=None),
            "mean_retained_energy": _mean(ret),
            "seconds": self.info.get("seconds"),
            **_adapter_summary(self.layers),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "info": self.info, "warnings": self.warnings,
                "layers": [_record_dict(r) for r in self.layers]}

    def write_json(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self, max_rows: int = 40) -> str:
        """A readable per-layer table (the first and last rows when long) and the summary."""
        head = f"{'module':<64} {'shape':>16} {'k':>5} {'phi_L':>6} {'phi_R':>6}  result"
        rows = [head, "-" * len(head)]
        layers = self.layers
        shown = layers if len(layers) <= max_rows else layers[: max_rows // 2] + [None] + layers[-max_rows // 2:]
        for r in shown:
            if r is None:
                rows.append(f"  ... {len(layers) - max_rows} more (see --report for all) ...")
                continue
            name = r.module or r.source_key
            name = name if len(name) <= 64 else "..." + name[-61:]
            shape = "x".join(map(str, r.shape)) if r.shape else "-"
            rows.append(f"{name:<64} {shape:>16} {_f(r.k, 'd'):>5} {_f(r.phi_left):>6} {_f(r.phi_right):>6}  "
                        f"{'ok' if r.transferred else 'skip: ' + r.reason}")
        s = self.summary()
        rows.append("")
        rows.append(f"transferred {s['transferred']} of {s['layers']} layers"
                    + (f"; skipped: " + ", ".join(f"{v} {k}" for k, v in s["skipped_by_reason"].items())
                       if s["skipped"] else ""))
        if s["mean_phi_left"] is not None:
            rows.append(f"mean phi left {s['mean_phi_left']:.4f}, right {s['mean_phi_right']:.4f}; "
                        f"min {s['min_phi']:.4f}; k {s['k_min']}..{s['k_max']}")
        if s["mean_retained_energy"] is not None:
            rows.append(f"mean retained energy after compression {s['mean_retained_energy']:.4f}")
        if s.get("adapters"):
            rows.append("adapters written as LoRA: " + ", ".join(f"{v} {k}" for k, v in s["adapters"].items())
                        + f"; compression error max {s['max_compression_error']:.2e}"
                        + f", ranks {s['converted_rank_min']}..{s['converted_rank_max']}")
        if s["seconds"] is not None:
            rows.append(f"time {s['seconds']:.2f} s")
        return "\n".join(rows)


def _adapter_summary(layers: list[LayerRecord]) -> dict[str, Any]:
    """Counts of converted adapter kinds and their worst compression error (empty for plain LoRA)."""
    conv = [r for r in layers if r.adapter is not None and r.adapter != "lora"]
    if not conv:
        return {}
    errs = [r.compression_error for r in conv if r.compression_error is not None]
    ranks = [r.rank_in for r in conv if r.rank_in is not None]
    return {"adapters": dict(Counter(r.adapter for r in conv)), "max_compression_error": max(errs, default=0.0),
            "converted_rank_min": min(ranks, default=None), "converted_rank_max": max(ranks, default=None)}


def _reason_class(reason: str) -> str:
    return "below tau" if "< tau" in reason else reason


def _f(x, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def write_batch_json(path: str | Path, batch: Any) -> None:
    """One JSON for a batch: every LoRA's report, the failures and the engine's figures."""
    data = {
        "results": [{"lora": r.report.info.get("lora"), "output": str(r.output), **r.report.to_dict()}
                    for r in batch.results],
        "failures": [{"lora": f.lora, "error": f.error} for f in batch.failures],
        "engine": asdict(batch.stats),
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
