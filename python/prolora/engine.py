"""Run a plan's layer jobs: load weights, compute bases, apply the method, build output modules."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .checkpoints import BaseModel
from .lora import LoraModule
from .method import LayerMath, transfer_layer
from .ops import Basis, truncated_svd
from .ops.projection import project_lora
from .ops.registry import Op, override_for
from .ops.svd import problem_for
from .options import TransferOptions
from .plan import LayerJob, Plan
from .report import LayerRecord

Progress = Callable[[int], None]


@dataclass
class JobResult:
    job: LayerJob
    math: LayerMath
    module: LoraModule | None  # the output module (None: dropped)
    seconds: float


def _backend(op: Op, opts: TransferOptions, W: torch.Tensor | None = None):
    problem = problem_for(W) if W is not None else problem_for(torch.empty(0, 0, dtype=opts.compute_dtype))
    return op.choose(problem, override_for(op, opts.backends)).backend.fn


class BasisSource:
    """Bases of one model's weights, computed on demand (the basis cache of issue 3 plugs in here)."""

    def __init__(self, model: BaseModel, opts: TransferOptions):
        self.model, self.opts = model, opts

    def weight(self, module: str) -> torch.Tensor:
        W = self.model.load(module, dtype=self.opts.compute_dtype).to(self.opts.device)
        return W.reshape(W.shape[0], -1)

    def basis(self, module: str, k: int | None = None) -> Basis:
        """Top-k triplets (all of them for k=None) of the module's weight."""
        W = self.weight(module)
        return _backend(truncated_svd, self.opts, W)(W, k, dtype=self.opts.compute_dtype)


def _folded_module(job: LayerJob, math: LayerMath) -> LoraModule:
    """The transferred factors as a module with scale 1 (alpha None), conv shapes restored."""
    lm, up, down = job.lora, math.up, math.down
    r = up.shape[1]
    if lm.is_conv:
        up, down = up.reshape(up.shape[0], r, 1, 1), down.reshape(r, *lm.down.shape[1:])
    return LoraModule(job.out_key, down, up, None, lm.bias)


def _copied(job: LayerJob) -> LoraModule:
    lm = job.lora
    return LoraModule(job.out_key, lm.down, lm.up, lm.alpha, lm.bias)


def _with_alpha(m: LoraModule, alpha: float | None, dtype: torch.dtype) -> LoraModule:
    """The same dW = scale * up @ down written with `alpha` (None: scale 1), in `dtype`."""
    new_scale = 1.0 if alpha is None else alpha / m.rank
    up = m.up.double() * (m.scale / new_scale)
    return LoraModule(m.key, m.down.to(dtype).contiguous(), up.to(dtype).contiguous(), alpha, m.bias)


def finalize(results: list["JobResult"], opts: TransferOptions, dtype: torch.dtype) -> dict[str, LoraModule]:
    """Output modules in the chosen alpha convention: `keep` writes each module with its input
    alpha; `rank` writes one alpha (the largest output rank) for all, since loaders such as
    diffusers apply one alpha per component. Copied modules stay bit-for-bit unless converted."""
    out: dict[str, LoraModule] = {}
    made = [r for r in results if r.module is not None and r.math.up is not None]
    top = max((r.module.rank for r in made), default=0)
    for r in results:
        m = r.module
        if m is None:
            continue
        if r.math.up is not None:
            m = _with_alpha(m, r.job.lora.alpha if opts.alpha == "keep" else float(top), dtype)
        elif opts.alpha == "rank" and opts.method != "copy" and top:
            m = _with_alpha(m, float(top), dtype)
        out[m.key] = m
    return out


def run_job(job: LayerJob, src: BasisSource, tgt: BasisSource, opts: TransferOptions,
            dtype: torch.dtype) -> JobResult:
    t0 = time.perf_counter()
    lm = job.lora
    if opts.method == "copy":
        math = LayerMath(None, None, True, "copied")
        return JobResult(job, math, _copied(job), time.perf_counter() - t0)
    m = job.shape[0]
    dim = min(m, lm.in_features)
    sb = src.basis(job.module)
    k = opts.subspace.choose(dim, sb.S, sb.energy)
    tb = tgt.basis(job.target_module, k)
    B = lm.up.reshape(m, lm.rank).to(opts.compute_dtype).to(opts.device) * lm.scale
    A = lm.down.reshape(lm.rank, -1).to(opts.compute_dtype).to(opts.device)
    math = transfer_layer(B, A, sb.truncate(k), tb, method=opts.method, tau=opts.tau, rank=opts.rank,
                          r_in=lm.rank, project=_backend(project_lora, opts))
    if math.transferred:
        out = _folded_module(job, math)
    elif opts.skipped == "copy":
        out, math.reason = _copied(job), math.reason + " (copied unchanged)"
    else:
        out = None
    return JobResult(job, math, out, time.perf_counter() - t0)


def run_plan(plan: Plan, source: BaseModel, target: BaseModel, opts: TransferOptions, dtype: torch.dtype,
             progress: Progress | None = None) -> list[JobResult]:
    """Every job in order; `progress(1)` after each."""
    src, tgt = BasisSource(source, opts), BasisSource(target, opts)
    results = []
    for job in plan.jobs:
        results.append(run_job(job, src, tgt, opts, dtype))
        if progress:
            progress(1)
    return results


def record(res: JobResult) -> LayerRecord:
    m, job = res.math, res.job
    return LayerRecord(
        module=job.module, source_key=job.lora_key, target_key=res.module.key if res.module else None,
        shape=job.shape, transferred=m.transferred, reason=m.reason, k=m.k, phi_left=m.phi_left,
        phi_right=m.phi_right, phi_null_left=m.phi_null_left, phi_null_right=m.phi_null_right, gap=m.gap,
        rank_in=job.lora.rank, rank_out=res.module.rank if res.module else None,
        retained_energy=m.retained_energy, seconds=round(res.seconds, 6))
