"""One LoRA module through the method, and what becomes of its result: parked on disk until its
LoRA is complete, then put in the output's alpha convention and dtype. Also the record of every
layer's outcome for the report."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..lora import LoraFile, LoraModule
from ..method import LayerMath, Similarity, transfer_layer, transfer_layer_widths
from ..ops import Basis, small_svd
from ..ops.registry import override_for
from ..options import TransferOptions
from ..plan import LayerJob, Plan
from ..report import LayerRecord
from ..spill import Parked, Spill


@dataclass
class JobResult:
    job: LayerJob
    math: LayerMath
    module: LoraModule | None  # the output module (None: dropped); on the meta device while parked
    seconds: float
    spill: Spill | None = None
    parked: tuple[Parked, Parked] | None = None  # (down, up) in `spill`
    final: bool = False  # the module is in its output alpha convention and dtype already

    @property
    def computed(self) -> bool:
        """Factors made by the method (not copied from the input)."""
        return self.math.up is not None or self.parked is not None

    def park(self, spill: Spill, opts: TransferOptions, dtype: torch.dtype) -> None:
        """Move computed factors to `spill` until the LoRA is complete; in the output dtype when
        the alpha convention does not wait for the other layers (`keep`)."""
        if self.module is None or self.math.up is None:
            return
        m = self.module
        if opts.alpha == "keep" and self.job.lora.kind == "lora":  # converted adapters wait (finalize)
            m, self.final = _with_alpha(m, self.job.lora.alpha, dtype), True
        self.spill, self.parked = spill, (spill.put(m.down), spill.put(m.up))
        self.module = LoraModule(m.key, m.down.to("meta"), m.up.to("meta"), m.alpha, m.bias, kind=m.kind)
        self.math.up = self.math.down = None

    def output(self) -> LoraModule | None:
        """The output module with its factors in memory."""
        if self.parked is None:
            return self.module
        m = self.module
        return LoraModule(m.key, self.spill.get(self.parked[0]), self.spill.get(self.parked[1]), m.alpha, m.bias,
                          kind=m.kind)

    def record(self) -> LayerRecord:
        """The report's record: the method's verdict and figures, and where the layer is."""
        job, out = self.job, self.module
        return dataclasses.replace(
            self.math.record, module=job.module, source_key=job.lora_key, target_key=out.key if out else None,
            shape=job.shape, rank_in=job.lora.rank, rank_out=out.rank if out else None,
            seconds=round(self.seconds, 6), **_adapter_fields(job.lora))


def _adapter_fields(lm: LoraModule) -> dict:
    """The report's adapter kind and compression error, for modules that were not a plain LoRA."""
    if lm.kind == "lora":
        return {}
    return {"adapter": lm.kind, "compression_error": 0.0 if lm.error is None else float(lm.error)}


def realize(job: LayerJob, weight: torch.Tensor, opts: TransferOptions) -> None:
    """Form a DoRA module's dW on the source weight (its own shape) and put the LoRA it is
    written as in the job (formats.adapters.realize_dora)."""
    from ..formats.adapters import realize_dora

    job.lora = realize_dora(job.lora, weight.reshape(job.shape), opts.conversion())


@dataclass
class LoraTask:
    """One LoRA of a batch and its progress through the engine."""

    lora: LoraFile
    plan: Plan
    output: Path | None = None
    results: list[JobResult] = field(default_factory=list)
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or len(self.results) == len(self.plan.jobs)


def _folded_module(job: LayerJob, math_: LayerMath) -> LoraModule:
    """The transferred factors as a module with scale 1 (alpha None), conv shapes restored."""
    lm, up, down = job.lora, math_.up, math_.down
    r = up.shape[1]
    if lm.is_conv:
        kernel = job.target_shape[1:] if job.widths_differ else lm.down.shape[1:]
        up, down = up.reshape(up.shape[0], r, 1, 1), down.reshape(r, *kernel)
    return LoraModule(job.out_key, down, up, None, lm.bias, kind=lm.kind)


def _copied(job: LayerJob) -> LoraModule:
    lm = job.lora
    return LoraModule(job.out_key, lm.down, lm.up, lm.alpha, lm.bias, kind=lm.kind)


def factors(job: LayerJob, basis: Basis) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of a job's LoRA module as the method takes them: B (m x r) with the scale folded
    in, A (r x n), in the bases' dtype, on the bases' device."""
    lm = job.lora
    dev, dt = basis.U.device, basis.U.dtype
    B = _to(lm.up.reshape(job.shape[0], lm.rank), dev).to(dt) * lm.scale
    A = _to(lm.down.reshape(lm.rank, -1), dev).to(dt)
    return B, A


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; to a GPU through pinned memory, so that the copy does not wait."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t if t.is_pinned() else t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def matrix_shape(job: LayerJob) -> tuple[int, int]:
    return job.shape[0], math.prod(job.shape[1:])


def run_job(job: LayerJob, src: Basis | None, tgt: Basis | None, opts: TransferOptions,
            shared: Similarity | None = None, projected=None, project=None, to_host=None) -> JobResult:
    """One LoRA module through the method (no bases needed for `copy`). `projected`: its
    (up, down) when the module's LoRAs were projected together; else `project` (a project_lora
    backend function) projects it here. Finished factors come back to the host: by `to_host`
    ([up, down] -> host tensors, e.g. non-blocking copies the caller waits for) when given."""
    t0 = time.perf_counter()
    if opts.method == "copy":
        if job.widths_differ:  # a copy cannot change a layer's shape
            rec = LayerRecord(transferred=False, reason=f"target weight has shape {job.target_shape}")
            return JobResult(job, LayerMath(None, None, rec), None, time.perf_counter() - t0)
        return JobResult(job, LayerMath(None, None, LayerRecord(transferred=True, reason="copied")), _copied(job),
                         time.perf_counter() - t0)
    # projected together: the factors are not needed again (transfer_layer takes only `projected`)
    B, A = factors(job, src) if projected is None or job.widths_differ else (None, None)
    svd = override_for(small_svd, opts.backends)
    if job.widths_differ:
        res = transfer_layer_widths(B, A, src, tgt, tau=opts.tau, rank=opts.rank, r_in=job.lora.rank, svd=svd)
    else:
        res = transfer_layer(B, A, src, tgt, method=opts.method, tau=opts.tau, rank=opts.rank, r_in=job.lora.rank,
                             project=project, svd=svd, shared=shared, projected=projected)
    rec = res.record
    if rec.transferred:
        res.up, res.down = to_host([res.up, res.down]) if to_host is not None else (res.up.cpu(), res.down.cpu())
        out = _folded_module(job, res)
    elif opts.skipped == "copy" and not job.widths_differ:
        out, rec.reason = _copied(job), rec.reason + " (copied unchanged)"
    else:
        out = None
    return JobResult(job, res, out, time.perf_counter() - t0)


def _with_alpha(m: LoraModule, alpha: float | None, dtype: torch.dtype) -> LoraModule:
    """The same dW = scale * up @ down written with `alpha` (None: scale 1), in `dtype`."""
    new_scale = 1.0 if alpha is None else alpha / m.rank
    up = m.up.double() * (m.scale / new_scale)
    return LoraModule(m.key, m.down.to(dtype).contiguous(), up.to(dtype).contiguous(), alpha, m.bias, kind=m.kind)


def finalize(results: list[JobResult], opts: TransferOptions, dtype: torch.dtype) -> dict[str, LoraModule]:
    """Output modules in the chosen alpha convention: `keep` writes each module with its input
    alpha; `rank` writes one alpha (the largest output rank) for all, since loaders such as
    diffusers apply one alpha per component (so do converted adapters, whatever the option).
    Copied modules stay bit-for-bit unless converted."""
    out: dict[str, LoraModule] = {}
    made = [r for r in results if r.module is not None and r.computed]
    top = max((r.module.rank for r in made), default=0)
    for r in results:
        m = r.output()
        if m is None or r.final:
            pass
        elif r.computed:
            # a converted adapter (LoKr, LoHa, DoRA...) has no alpha convention to keep, and its ranks
            # differ per module: one alpha for all (diffusers applies one per component; kohya and
            # ComfyUI read each module's), as --alpha rank writes
            keep = opts.alpha == "keep" and r.job.lora.kind == "lora"
            m = _with_alpha(m, r.job.lora.alpha if keep else float(top), dtype)
        elif opts.alpha == "rank" and opts.method != "copy" and top:
            m = _with_alpha(m, float(top), dtype)
        if m is not None:
            out[m.key] = m
    return out
