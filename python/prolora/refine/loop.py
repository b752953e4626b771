"""The refinement itself: train the transferred LoRA's factors so that the target with them
reproduces the source LoRA's effect on the source,

    minimize  E || (T + L')(x, t, c) - [ T(x, t, c) + (S + L)(x, t, c) - S(x, t, c) ] ||^2
              + anchor * sum ||p - p0||^2 / sum ||p0||^2      (p: L' factors, p0: the transfer's)

with x pure Gaussian latent noise, t a random timestep and c the conditioning of cond.py. S and T
stay in their stored dtype and frozen; L' is float32 and the only thing Adam updates. Every random
draw comes from one CPU generator seeded with `seed`, so a run is repeatable bit for bit on the
same machine and device.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import OptionError
from .adapters import Adapter
from .cond import Conditioner, Inputs


@dataclass
class RefineOptions:
    """Settings of `--refine` (steps 0: off)."""

    steps: int = 0
    lr: float = 1e-2  # Adam step size relative to each factor's RMS (relative_groups; set on the quality benchmark)
    batch: int = 8
    anchor: float = 0.0  # weight of the relative L2 pull toward the transferred factors
    resolution: int | None = None  # latent size; None: the model's sample size, at most 32
    seed: int = 0
    cond: str | None = None  # prompts | prompts:FILE | tags | random; None: tags if the LoRA has them, else prompts
    tokens: int | None = None  # context tokens for random (None: the encoders' 77 / the family's; required without one)
    holdout: int = 16  # held-out inputs the delta-matching error is measured on
    text_encoders: tuple[str, ...] = ()  # --text-encoder FILE (repeatable): encoders for models that carry none

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seed", "holdout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise OptionError(f"refine {name} {v!r}: must be an integer")
        if self.steps < 0 or self.batch < 1 or self.holdout < 1:
            raise OptionError("refine steps must be >= 0, batch and holdout >= 1")
        if not self.lr > 0 or not self.anchor >= 0:
            raise OptionError(f"refine lr {self.lr!r} must be > 0 and anchor {self.anchor!r} >= 0")
        if self.resolution is not None and int(self.resolution) < 2:
            raise OptionError(f"refine resolution {self.resolution!r}: must be at least 2")
        if self.tokens is not None and int(self.tokens) < 1:
            raise OptionError(f"refine tokens {self.tokens!r}: must be at least 1")
        from .cond import parse_cond

        parse_cond(self.cond)
        if isinstance(self.text_encoders, (str, bytes)) or not all(isinstance(f, str) for f in self.text_encoders):
            raise OptionError(f"refine text_encoders {self.text_encoders!r}: a list of file paths")
        self.text_encoders = tuple(self.text_encoders)

    @classmethod
    def of(cls, value: "RefineOptions | dict | int | None") -> "RefineOptions | None":
        """From a RefineOptions, a dict of its fields, a step count, or None (off)."""
        if value is None or isinstance(value, RefineOptions):
            return value if value is None or value.steps > 0 else None
        if isinstance(value, dict):
            return cls.of(cls(**value))
        return cls.of(cls(steps=value))

    def describe(self, cond: str, tokens: int, resolution: int) -> dict[str, str]:
        """The settings as provenance strings (cond, tokens and resolution as resolved)."""
        return {"steps": str(self.steps), "lr": f"{self.lr:g}", "batch": str(self.batch), "anchor": f"{self.anchor:g}",
                "resolution": str(resolution), "seed": str(self.seed), "cond": cond, "tokens": str(tokens)}


@dataclass
class RefineStats:
    """What the refinement did: the loss curve and the delta-matching error before and after.

    error = E||(T+L')(x) - [T(x) + (S+L)(x) - S(x)]||^2 / E||(S+L)(x) - S(x)||^2 on `holdout`
    inputs drawn apart from the training ones, with held-out contexts (conditioning.py; 0: the
    target reproduces the source's delta). `kept` is False when the refined factors did not do
    better there than the transfer's beyond the held-out noise (`improved`): the output is then
    the transfer, unrefined."""

    steps: int
    loss_first: float
    loss_last: float
    loss_min: float
    error_before: float
    error_after: float
    seconds: float
    curve: list[float] = field(default_factory=list)  # mean loss per tenth of the run
    modules: dict[str, float] = field(default_factory=dict)  # relative change of each module's dW
    settings: dict[str, str] = field(default_factory=dict)
    conditioning: dict[str, str] = field(default_factory=dict)  # what conditioned it and from where
    kept: bool = True  # the refined factors were kept (False: the held-out error did not fall beyond its noise)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: build, encode, held_out, steps
    probes: dict[str, list[float]] = field(default_factory=dict)  # other context shapes: [before, after]

    def asdict(self) -> dict:
        return asdict(self)


def _forward(model: torch.nn.Module, kw: dict) -> torch.Tensor:
    return model(**kw, return_dict=False)[0].float()


class Pair:
    """The two denoisers with their adapters: S with L (frozen), T with L' (trained)."""

    def __init__(self, source: torch.nn.Module, target: torch.nn.Module, lora: Adapter, refined: Adapter) -> None:
        self.source, self.target, self.lora, self.refined = source, target, lora, refined
        self.dtypes = (next(source.parameters()).dtype, next(target.parameters()).dtype)

    @torch.no_grad()
    def goal(self, inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(T(x) + (S+L)(x) - S(x), (S+L)(x) - S(x)) for a batch, in float32."""
        self.lora.enabled = False
        s0 = _forward(self.source, inp.source)
        self.lora.enabled = True
        delta = _forward(self.source, inp.source) - s0
        self.refined.enabled = False
        t0 = _forward(self.target, inp.target)
        self.refined.enabled = True
        return t0 + delta, delta

    def predict(self, inp: Inputs) -> torch.Tensor:
        self.refined.enabled = True
        return _forward(self.target, inp.target)


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


@torch.no_grad()
def held_out_terms(pair: Pair, batches: list[Inputs]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input: (||(T+L')(x) - goal||^2, ||(S+L)(x) - S(x)||^2)."""
    err, ref = [], []
    for inp in batches:
        goal, delta = pair.goal(inp)
        err.append((pair.predict(inp) - goal).pow(2).flatten(1).sum(1).double())
        ref.append(delta.pow(2).flatten(1).sum(1).double())
    return torch.cat(err), torch.cat(ref)


def held_out_error(pair: Pair, batches: list[Inputs]) -> float:
    err, ref = held_out_terms(pair, batches)
    return float(err.sum() / ref.sum().clamp_min(1e-30))


def improved(before: torch.Tensor, after: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether the held-out error fell beyond the noise of the held-out inputs: the mean of the
    paired per-input falls (before - after, relative to each input's delta) more than twice its
    standard error, and the pooled error lower (one input: simply lower). A fall within the noise
    keeps the transfer."""
    if not after.sum() < before.sum():
        return False
    d = (before - after) / ref.clamp_min(1e-30)
    if len(d) < 2:
        return bool(d.sum() > 0)
    return bool(d.mean() > 2 * d.std() / len(d) ** 0.5)


def relative_groups(start: list[torch.Tensor], params: list[torch.nn.Parameter], lr: float) -> list[dict]:
    """One Adam group per factor, its step size `lr` times the factor's initial RMS: Adam moves
    every entry by about its lr per step whatever the gradient's size, so an absolute lr would mean
    a different relative change for every LoRA (factor scales differ by orders of magnitude between
    trainers and alpha conventions). A zero factor takes the mean RMS of the others."""
    rms = [float(p.pow(2).mean().sqrt()) if p.numel() else 0.0 for p in start]
    nonzero = [r for r in rms if r > 0]
    fallback = sum(nonzero) / len(nonzero) if nonzero else 1.0
    return [{"params": [p], "lr": lr * (r if r > 0 else fallback)} for p, r in zip(params, rms)]


def train(pair: Pair, cond: Conditioner, opts: RefineOptions, interrupt_check=None,
          heldout: Conditioner | None = None, probes: dict[str, Conditioner] | None = None) -> RefineStats:
    """Run `opts.steps` Adam steps on the refined adapter's factors; returns the stats. The
    held-out error is measured on `heldout`'s inputs (default: other draws from `cond`), and
    before and after on each of `probes` (reported only: stats.probes)."""
    t0 = time.perf_counter()
    params = [p for p in pair.refined.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    start_norm = sum(float(p.pow(2).sum()) for p in start) or 1.0
    g = torch.Generator().manual_seed(opts.seed)
    held = torch.Generator().manual_seed(opts.seed + 1_000_003)
    holdout = [(heldout or cond).batch(n, held, pair.dtypes) for n in _chunks(opts.holdout, opts.batch)]
    err0, ref = held_out_terms(pair, holdout)
    before = float(err0.sum() / ref.sum().clamp_min(1e-30))
    probed = {k: [c.batch(n, held, pair.dtypes) for n in _chunks(opts.holdout, opts.batch)]
              for k, c in (probes or {}).items()}
    shape = {k: [held_out_error(pair, b)] for k, b in probed.items()}
    t_held = time.perf_counter() - t0
    opt = torch.optim.Adam(relative_groups(start, params, opts.lr))
    losses: list[float] = []
    for _ in range(opts.steps):
        inp = cond.batch(opts.batch, g, pair.dtypes)
        goal, _ = pair.goal(inp)
        loss = (pair.predict(inp) - goal).pow(2).mean()
        if opts.anchor > 0:
            loss = loss + opts.anchor * sum((p - p0).pow(2).sum() for p, p0 in zip(params, start)) / start_norm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if interrupt_check is not None:
            interrupt_check()
    t_steps = time.perf_counter()
    err1 = held_out_terms(pair, holdout)[0] if opts.steps else err0
    after = float(err1.sum() / ref.sum().clamp_min(1e-30))
    for k, b in probed.items():
        shape[k].append(held_out_error(pair, b))
    t_held += time.perf_counter() - t_steps
    tenth = max(1, len(losses) // 10)
    curve = [round(sum(losses[i:i + tenth]) / len(losses[i:i + tenth]), 6) for i in range(0, len(losses), tenth)]
    total = time.perf_counter() - t0
    return RefineStats(opts.steps, losses[0] if losses else 0.0, losses[-1] if losses else 0.0,
                       min(losses) if losses else 0.0, before, after, round(total, 3), curve,
                       kept=improved(err0, err1, ref), probes={k: [round(v, 6) for v in x] for k, x in shape.items()},
                       timings={"held_out": round(t_held, 3), "steps": round(total - t_held, 3)})
