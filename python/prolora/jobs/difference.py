"""The math of an extract chunk: per layer and tuned checkpoint the difference dW = W_tuned - W_base
(float32 from the stored dtype, formed row block by row block straight into the SVD's batch), its
top-r singular triplets from the truncated_svd op (same-shape layers batched: the randomized
backend where r is small relative to the layer, its contract a Frobenius error within 1% of
optimal; else an exact SVD) and the factors up = U sqrt(S), down = sqrt(S) V^T (balanced for
float16). sd-scripts' `clamp_quantile` and `min_diff` are here too, reimplemented from their
meaning; identical layers are skipped and reported."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import BaseModel
from ..errors import ModelError
from ..lora import LoraModule
from ..method import KMode
from ..ops.registry import Problem
from ..ops.svd import truncated_svd
from ..ops.svd_randomized import NAME as RANDOMIZED, check as randomized_check
from .extract_spec import ExtractOptions, LayerExtract


@dataclass
class Layer:
    """One layer of an extract pass: its canonical module, shape, output key and rank; `skip` is
    its status when it is reported without being read (conv-skipped, unspellable)."""

    module: str
    shape: tuple[int, ...]
    key: str | None
    k_cap: int | None  # the fixed rank (or the energy rule's cap) of this layer
    skip: str | None = None  # status when skipped before reading
    reason: str = ""

    @property
    def flat(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])


@dataclass
class Target:
    """One tuned checkpoint in flight: its model, output path and what has been computed."""

    path: Path
    model: BaseModel
    output: Path
    modules: dict[str, LoraModule] = field(default_factory=dict)
    lines: list[LayerExtract] = field(default_factory=list)


def _k_spec(layer: Layer, opts: ExtractOptions):
    """A layer's k for truncated_svd: its rank, or the --energy rule (method.KMode) capped at it."""
    if opts.energy is None:
        return layer.k_cap
    mode, cap = KMode("energy", opts.energy), layer.k_cap

    def choose(S: torch.Tensor, energy: float) -> int:  # the exact backends give the whole spectrum
        k = mode.choose(int(S.numel()), S, energy)
        return max(1, min(k, cap) if cap is not None else k)

    return choose


def _svd(D: torch.Tensor, ks: list, opts: ExtractOptions) -> tuple[list, str]:
    """Top-k bases of a batch D (b, m, n) of same-shape differences, and the backend's name."""
    m, n = D.shape[-2:]
    fixed = all(isinstance(k, int) for k in ks)
    kmax = max(ks) if fixed else None
    problem = Problem(device=D.device.type, dtype="float32", shape=(m, n), batch=D.shape[0], k=kmax)
    if opts.backend == RANDOMIZED:
        name = RANDOMIZED
        fn = truncated_svd.backends[RANDOMIZED].fn  # forced: also where dispatch would call it too small
    else:
        name = RANDOMIZED if opts.backend == "auto" and fixed and randomized_check(problem) is None else "svd"
        if opts.backend == "auto" and not fixed:  # --energy: the transfer's basis (Gram + topk_eigh) fits
            name = truncated_svd.choose(problem).backend.name  # (a fixed rank near d does not: full SVD)
        fn = truncated_svd.choose(problem, override=name).backend.fn
    return fn(D, ks), name


def _clamp(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp both factors' values to +-(the q quantile of the absolute values of both)."""
    flat = torch.cat([up.reshape(-1), down.reshape(-1)]).abs()
    idx = max(1, min(flat.numel(), math.ceil(q * flat.numel())))
    hi = float(torch.kthvalue(flat.float(), idx).values)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def _factors(layer: Layer, basis, D: torch.Tensor, opts: ExtractOptions) -> tuple[LoraModule, float, float]:
    """(module, retained energy, relative error) of one layer's basis."""
    k = basis.k
    S = basis.S[:k].double()
    energy = basis.energy
    kept_energy = float((S ** 2).sum())
    s = S.sqrt().to(basis.U.dtype)
    up = basis.U * s
    down = (basis.V * s).T
    if opts.clamp_quantile is not None and opts.clamp_quantile < 1:
        up, down = _clamp(up, down, opts.clamp_quantile)
        err = float((D.double() - up.double() @ down.double()).norm() / math.sqrt(energy)) if energy > 0 else 0.0
    else:  # U_k^T D = S_k V_k^T for every backend here, so the error follows from the energies
        err = math.sqrt(max(0.0, energy - kept_energy) / energy) if energy > 0 else 0.0
    kept = kept_energy / energy if energy > 0 else 1.0
    if len(layer.shape) == 4:
        down = down.reshape((k,) + tuple(layer.shape[1:]))
        up = up.reshape(layer.shape[0], k, 1, 1)
    # alpha = rank (scale 1) spelled out: a PEFT file then carries it in lora_adapter_metadata, without
    # which diffusers would scale a module of another rank than the file's most common one
    mod = LoraModule(layer.key, down.to(opts.save_dtype).contiguous(), up.to(opts.save_dtype).contiguous(), float(k))
    return mod, min(1.0, kept), err


# rows of a difference formed at a time: ~1 MiB of float32, so that forming it, its largest
# entry and its copy into the SVD's batch are one pass over memory, not four
_BLOCK_ELEMENTS = 1 << 18


def _difference(wt: torch.Tensor, wb: torch.Tensor, out: torch.Tensor) -> float:
    """out (float32, m x n) <- wt - wb, computed in float32 (the inputs in their stored dtype),
    row block by row block; returns max |out| (NaN if any entry is NaN). aminmax, not the
    inf-norm: on this CPU torch's inf-norm is ~20x slower than one min/max pass."""
    m, n = out.shape
    wt, wb = wt.reshape(m, n), wb.reshape(m, n)
    step = max(1, _BLOCK_ELEMENTS // n)
    top = 0.0
    for r in range(0, m, step):
        blk = out[r:r + step]
        blk.copy_(wt[r:r + step])
        blk.sub_(wb[r:r + step])
        lo, hi = (float(v) for v in torch.aminmax(blk))
        if math.isnan(lo) or math.isnan(hi):
            return math.nan
        top = max(top, -lo, hi)
    return top


def compute_chunk(chunk: list[Layer], data: dict, targets: list[Target], opts: ExtractOptions) -> None:
    """Differences of a chunk's layers, their SVDs (same-shape layers batched) and factors, into
    each target's modules and lines. `data`: {module: (base raw, [tuned raw per target])}; its
    entries are taken out as they are used."""
    groups: dict[tuple[int, int], list[tuple[Layer, Target, torch.Tensor, torch.Tensor]]] = {}
    for x in chunk:
        if x.skip:
            for t in targets:
                t.lines.append(LayerExtract(x.module, x.key, x.shape, x.skip, reason=x.reason))
            continue
        wb, wts = data.pop(x.module)
        for t, wt in zip(targets, wts):
            groups.setdefault(x.flat, []).append((x, t, wt, wb))
    for shape, group in groups.items():
        batch = torch.empty((len(group),) + shape, dtype=torch.float32)  # the differences, in place
        items: list[tuple[Layer, Target, float]] = []
        for x, t, wt, wb in group:
            top = _difference(wt, wb, batch[len(items)])
            if top == 0.0:
                t.lines.append(LayerExtract(x.module, x.key, x.shape, "identical"))
            elif not math.isfinite(top):
                raise ModelError(f"{t.path}: layer '{x.module}' differs from BASE by NaN or Inf")
            elif top < opts.min_diff:
                t.lines.append(LayerExtract(x.module, x.key, x.shape, "below-min-diff", max_abs_diff=top,
                                            reason=f"max |dW| {top:.3g} < --min-diff {opts.min_diff:g}"))
            else:
                items.append((x, t, top))
        del group
        if not items:
            continue
        ks = [_k_spec(x, opts) for x, _, _ in items]
        if all(isinstance(k, int) for k in ks):
            ks = [min(k, min(shape)) for k in ks]
        D = batch[:len(items)]
        bases, name = _svd(D, ks, opts)
        for i, ((x, t, top), basis) in enumerate(zip(items, bases)):
            mod, kept, err = _factors(x, basis, D[i], opts)
            t.modules[x.key] = mod
            t.lines.append(LayerExtract(x.module, x.key, x.shape, "extracted", mod.rank, top, kept, err, name))
        del D, batch, bases, items
