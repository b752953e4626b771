"""`prolora resize`: change the rank of every module of a LoRA, by a fixed rank or by one of
sd-scripts' dynamic rules (sv_ratio, sv_fro, sv_cumulative; see factors.RankRule), working on
the factors only (method.factor_svd: QR of each side and an SVD of the small core; never a dense
m x n matrix).

A module of scale s (alpha / rank) written at new rank k gets alpha s * k and factors whose
product is the truncated dW / s, so diffusers, kohya and ComfyUI apply exactly the best rank-k
approximation of the input's dW. A module whose rule keeps every one of its singular values is
written unchanged (bit for bit). When the new ranks differ between modules, the alphas are then
made one (factors.uniform_alpha: the most common alpha, the others' scale folded into up),
because diffusers applies a single alpha to kohya files whose alphas differ.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..version import __version__
from ..errors import OutputPathError
from ..formats import read_lora, write_lora
from ..formats.adapters import refuse_base_dependent
from ..lora import LoraFile, LoraModule
from ..method import factor_svd
from .factors import EXACT, RankRule, uniform_alpha


@dataclass
class ModuleResize:
    """One module's outcome: its ranks and how much of its dW's energy (||dW||_F^2) is kept."""

    key: str
    old_rank: int
    new_rank: int
    retained_energy: float  # fraction of ||dW||_F^2 kept
    retained_fro: float  # sqrt of it: the fraction sv_fro speaks of
    unchanged: bool  # written as it was (no truncation)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ResizeResult:
    """The written file, its LoRA and the per-module report."""

    output: Path
    lora: LoraFile
    rule: RankRule
    modules: list[ModuleResize] = field(default_factory=list)

    def summary(self) -> dict:
        ranks = [m.new_rank for m in self.modules]
        return {"modules": len(self.modules), "rule": self.rule.spec(),
                "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0),
                "mean_retained_energy": sum(m.retained_energy for m in self.modules) / max(1, len(self.modules))}

    def report(self) -> dict:
        return {"job": "resize", "output": str(self.output), "summary": self.summary(),
                "modules": [m.as_dict() for m in self.modules]}

    def table(self) -> str:
        rows = [f"{'module':<70} {'rank':>9} {'energy':>8} {'fro':>8}"]
        for m in self.modules:
            rows.append(f"{m.key[-70:]:<70} {m.old_rank:>4}->{m.new_rank:<4} {m.retained_energy:>8.4f} "
                        f"{m.retained_fro:>8.4f}")
        s = self.summary()
        rows.append(f"{s['modules']} modules, ranks {s['rank_min']}..{s['rank_max']}, mean retained energy "
                    f"{s['mean_retained_energy']:.4f} ({s['rule']})")
        return "\n".join(rows)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def resize_module(m: LoraModule, rule: RankRule, dtype: torch.dtype | None = None,
                  svd: str | None = EXACT) -> tuple[LoraModule, ModuleResize]:
    """The module at the rank `rule` picks, and its report line. dW = scale * up @ down. The
    factor SVD runs in float64, its core on the small_svd backend `svd` (None: dispatched)."""
    f = factor_svd(_flat(m.up).double(), _flat(m.down).double(), svd)
    k = rule.choose(f.S)
    kept = f.retained(k)
    info = ModuleResize(m.key, m.rank, k, kept, kept ** 0.5, k == m.rank)
    if k == m.rank:  # nothing truncated: the input's own factors are the exact answer
        return m, info
    new_up, new_down = f.split(k)  # product = up @ down truncated: dW / scale
    out_dtype = dtype or m.up.dtype
    if m.is_conv:
        new_down = new_down.reshape((k,) + tuple(m.down.shape[1:]))
        new_up = new_up.reshape(m.up.shape[0], k, 1, 1)
    alpha = None if m.alpha is None else m.scale * k
    return LoraModule(m.key, new_down.to(out_dtype).contiguous(), new_up.to(out_dtype).contiguous(), alpha,
                      m.bias), info


def resize(lora: str | os.PathLike | LoraFile, output: str | os.PathLike, rule: RankRule | str | int,
           max_rank: int | None = None, report: str | os.PathLike | None = None) -> ResizeResult:
    """Resize every module of `lora` and write the result atomically to `output` (same format).

    `rule`: a RankRule, an int (fixed rank), or 'sv_ratio:F' / 'sv_fro:F' / 'sv_cumulative:F' /
    'rank:N'; `max_rank` caps a dynamic rule. `report`: also write the per-module report as JSON.
    """
    if isinstance(rule, int) and not isinstance(rule, bool):
        rule = RankRule("rank", float(rule))
    elif isinstance(rule, str):
        rule = RankRule.parse(rule, max_rank)
    lf = lora if isinstance(lora, LoraFile) else read_lora(lora)
    refuse_base_dependent(lf, "resize")
    output = Path(output)
    if lf.path is not None and output.exists() and output.resolve() == Path(lf.path).resolve():
        raise OutputPathError(f"{output}: is the input LoRA; refusing to overwrite an input, choose another output")
    modules: dict[str, LoraModule] = {}
    lines: list[ModuleResize] = []
    for key, m in lf.modules.items():
        new, info = resize_module(m, rule)
        modules[key] = new
        lines.append(info)
    md = dict(lf.metadata)
    md.update({"prolora.job": "resize", "prolora.resize": rule.spec(), "prolora.version": __version__})
    if lf.path is not None:
        md["prolora.input"] = Path(lf.path).name
    if len({float(m.rank if m.alpha is None else m.alpha) for m in modules.values()}) > 1:
        modules = uniform_alpha(modules)  # one alpha: diffusers mis-scales kohya files with several
    out = LoraFile(format=lf.format, modules=modules, metadata=md, dtype=lf.dtype, path=lf.path)
    write_lora(output, out)
    res = ResizeResult(output, out, rule, lines)
    if report is not None:
        from ..safetensors_io import atomic_path

        with atomic_path(report) as tmp:
            Path(tmp).write_text(json.dumps(res.report(), indent=2))
    return res
