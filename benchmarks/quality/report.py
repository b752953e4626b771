"""Markdown tables from the evaluation stages' rows.json, and the RESULTS.md block they fill."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import TARGETS
from .sweep import K_MODES, METHODS, TAUS

MARK_BEGIN, MARK_END = "<!-- tables:begin (written by python -m benchmarks.quality) -->", "<!-- tables:end -->"


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def load_rows(cache: Path, stage: str) -> list[dict[str, Any]]:
    return json.loads((cache / stage / "rows.json").read_text())


def main_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| candidate | layers transferred | weight cosine | weight rel. error | gap closed (eps) | "
             "loss gap closed | style (samples) | content (samples) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["group"] == "main"):
        s = r["scores"]
        layers = f"{r['transferred']}/{r['layers']}" if "layers" in r else "-"
        lines.append(f"| {r['label']} | {layers} | {_f(s['cosine'])} | {_f(s['rel_error'])} | {_f(s['gap_closed'])} "
                     f"| {_f(s['loss_closed'])} | {_pct(s['style'])} | {_pct(s['content'])} |")
    return lines


def sweep_table(rows: list[dict[str, Any]], group: str, key: str, values, labels) -> list[str]:
    """Rows: the swept value; columns: the methods; cells: gap closed (weight cosine) [layers]."""
    lines = [f"| {key} | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    index = {(r["label"], r[key]): r for r in rows if r["group"] == group}
    for v in values:
        cells = []
        for label in labels:
            r = index.get((label, v))
            if r is None:
                cells.append("-")
                continue
            s = r["scores"]
            layers = f" [{r['transferred']}/{r['layers']}]" if group == "tau" else ""
            cells.append(f"{_f(s['gap_closed'])} ({_f(s['cosine'], '.2f')}){layers}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def match_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| candidate | --match | layers transferred | weight cosine | gap closed (eps) |", "|---|---|---|---|---|"]
    for r in (r for r in rows if r["group"] == "match"):
        s = r["scores"]
        lines.append(f"| {r['label']} | {r['match']} | {r['transferred']}/{r['layers']} | {_f(s['cosine'])} "
                     f"| {_f(s['gap_closed'])} |")
    return lines


def tables(cache: Path) -> str:
    """All tables, as one markdown block."""
    out: list[str] = []
    src = load_rows(cache, "eval-source")
    cls = json.loads((cache / "classifiers" / "stage.json").read_text())["held_out_accuracy"]
    out += ["### Sanity checks", "",
            "Classifiers on held-out clean images: " + ", ".join(f"{k} {_pct(v)}" for k, v in cls.items()) + ".", "",
            "The source LoRA on the source model: "
            + "; ".join(f"{r['label']}: style {_pct(r['scores']['style'])}, content {_pct(r['scores']['content'])}"
                        for r in src) + ".", ""]
    projecting = [k for k in METHODS if k != "copy"]
    for target, title in TARGETS.items():
        rows = load_rows(cache, f"eval-{target}")
        phis = next(r for r in rows if r["label"] == "prolora-full" and r["group"] == "main")
        out += [f"### {title}", "",
                f"Subspace similarity at energy:0.9: mean phi {_f(phis['mean_phi'])}, min phi {_f(phis['min_phi'])}, "
                f"k {phis['k_min']}..{phis['k_max']}.", "",
                "Defaults (energy:0.9, tau 0.8, rank same, skipped drop) unless the row says otherwise:", ""]
        out += main_table(rows) + [""]
        out += ["k modes at tau 0 (every layer transferred); cell: gap closed (weight cosine):", ""]
        out += sweep_table(rows, "k", "k", K_MODES, projecting) + [""]
        out += ["tau at energy:0.9; cell: gap closed (weight cosine) [layers transferred]:", ""]
        out += sweep_table(rows, "tau", "tau", TAUS, projecting + ["prolora-full, skipped copy",
                                                                   "prolora 2r, skipped copy"]) + [""]
        if any(r["group"] == "match" for r in rows):
            out += ["Layer matching for the pruned target (tau 0):", ""] + match_table(rows) + [""]
    return "\n".join(out)


def update_results(results_md: Path, block: str) -> bool:
    """Replace the generated block of RESULTS.md; False when the markers are missing."""
    text = results_md.read_text() if results_md.exists() else ""
    if MARK_BEGIN not in text or MARK_END not in text:
        return False
    head, rest = text.split(MARK_BEGIN, 1)
    _, tail = rest.split(MARK_END, 1)
    results_md.write_text(f"{head}{MARK_BEGIN}\n{block}\n{MARK_END}{tail}")
    return True
