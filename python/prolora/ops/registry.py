"""Operator registry: each op is declared once; backends register implementations with an
eligibility check, and dispatch says which backend it chose and why it rejected the others."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import OptionError

ENV_VAR = "PROLORA_BACKEND"


@dataclass(frozen=True)
class Problem:
    """What dispatch looks at: where the data lives, its dtype, and how big the job is (the
    matrix shape, how many matrices at once, and the k and r where the op has them)."""

    device: str = "cpu"
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    batch: int = 1
    k: int | None = None
    r: int | None = None


Reason = Callable[[Problem], "str | None"]


@dataclass
class Backend:
    name: str
    fn: Callable[..., Any]
    # None when the backend can run `problem`, else a one-line reason
    check: Reason
    priority: int = 0
    reference: bool = False
    # None when the backend can run on this machine at all, else why not (no GPU, no build, ...)
    available: Callable[[], str | None] = lambda: None
    # for custom kernels: None when a measurement says the backend is the fastest way to run
    # `problem` here, else why not. It decides the default only: a forced backend runs anyway
    # (with one warning when it has no measurement).
    measured: Reason | None = None
    # fn over a list of operand tuples sharing the other arguments, when the backend does many
    # at once better than one by one (e.g. stacked products)
    batched: Callable[..., list] | None = None
    # keyword arguments fn takes beyond the op's common ones (e.g. a warm start); a caller passes
    # them through kwargs(), which drops the ones this backend does not take
    extras: tuple[str, ...] = ()
    # on a CPU the caller may run one matrix per host thread with one BLAS thread each (bases of
    # different layers concurrently, ops/host.py); False for backends that thread themselves
    host_threads: bool = False

    def kwargs(self, **kw: Any) -> dict[str, Any]:
        """The keyword arguments of `kw` that fn takes (its extras), Nones dropped."""
        return {k: v for k, v in kw.items() if k in self.extras and v is not None}

    def many(self, items: list[tuple], *args: Any, **kwargs: Any) -> list:
        """fn for each operand tuple of `items`, with the same other arguments."""
        if self.batched is not None:
            return self.batched(items, *args, **kwargs)
        return [self.fn(*item, *args, **kwargs) for item in items]


@dataclass
class Choice:
    backend: Backend
    rejected: dict[str, str] = field(default_factory=dict)
    warning: str | None = None  # a forced backend with no measurement behind it


_warned: set[tuple[str, str]] = set()


class Op:
    """A named operation with a reference implementation and optional fast ones."""

    def __init__(self, name: str, doc: str):
        self.name = name
        self.doc = doc
        self.backends: dict[str, Backend] = {}

    def register(self, name: str, *, priority: int = 0, reference: bool = False,
                 check: Reason | None = None, available: Callable[[], str | None] | None = None,
                 measured: Reason | None = None, batched: Callable[..., list] | None = None,
                 extras: tuple[str, ...] = (), host_threads: bool = False):
        def deco(fn):
            self.backends[name] = Backend(name, fn, check or (lambda p: None), priority, reference,
                                          available or (lambda: None), measured, batched, extras, host_threads)
            return fn

        return deco

    @property
    def reference(self) -> Backend:
        return next(b for b in self.backends.values() if b.reference)

    def runnable(self, problem: Problem) -> tuple[list[Backend], dict[str, str]]:
        """The backends that can run `problem` here, and why each other one cannot."""
        rejected: dict[str, str] = {}
        ok = []
        no_device = device_missing(problem.device)
        for b in self.backends.values():
            why = no_device or b.available() or b.check(problem)
            if why:
                rejected[b.name] = why
            else:
                ok.append(b)
        return ok, rejected

    def explain(self, problem: Problem) -> list[tuple[Backend, bool, str]]:
        """(backend, chosen by default, why or why not) for every backend of the op on `problem`:
        what `prolora backends` prints."""
        try:
            choice = self.choose(problem)
        except OptionError:
            choice = None
        ok, _ = self.runnable(problem)
        out = []
        for b in self.backends.values():
            chosen = choice is not None and choice.backend is b
            if b not in ok:
                why = device_missing(problem.device) or b.available()
                state = f"unavailable: {why}" if why else f"cannot run this problem: {b.check(problem)}"
            elif chosen:
                state = "available, the default"
            else:
                state = f"available; not the default: {choice.rejected.get(b.name) if choice else '?'}"
            out.append((b, chosen, state))
        return out

    def choose(self, problem: Problem, override: str | None = None) -> Choice:
        """The highest-priority backend that can run `problem` (custom kernels only where
        measured fastest), or `override`, which runs whenever it can run the problem at all."""
        ok, rejected = self.runnable(problem)
        if override:
            if override not in self.backends:
                raise OptionError(f"op {self.name} has no backend '{override}' "
                                  f"(choose from {', '.join(self.backends)})")
            if override in rejected:
                raise OptionError(f"backend '{override}' cannot run {self.name} here: {rejected[override]}")
            chosen = self.backends[override]
            for b in ok:
                if b is not chosen:
                    rejected[b.name] = "not requested"
            why = chosen.measured(problem) if chosen.measured else None
            warning = f"{self.name}: backend '{override}' forced: {why}" if why else None
            if warning and (self.name, override) not in _warned:
                _warned.add((self.name, override))
                warnings.warn(warning, RuntimeWarning, stacklevel=2)
            return Choice(chosen, rejected, warning)
        eligible = []
        for b in ok:
            why = b.measured(problem) if b.measured else None
            if why:
                rejected[b.name] = why
            else:
                eligible.append(b)
        if not eligible:
            raise OptionError(f"no backend of {self.name} can run this problem: {rejected}")
        chosen = max(eligible, key=lambda b: b.priority)
        for b in eligible:
            if b is not chosen:
                rejected[b.name] = f"eligible, lower priority than {chosen.name}"
        return Choice(chosen, rejected)


def device_missing(device: str) -> str | None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def parse_overrides(spec: str | None) -> dict[str, str]:
    """`op=backend,op=backend` or a bare `backend` (meaning every op that has it)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        op, sep, backend = part.partition("=")
        out[op if sep else "*"] = backend if sep else op
    return out


def overrides_from_env() -> dict[str, str]:
    return parse_overrides(os.environ.get(ENV_VAR))


def override_for(op: Op, overrides: dict[str, str]) -> str | None:
    if op.name in overrides:
        return overrides[op.name]
    star = overrides.get("*")
    return star if star in op.backends else None


def problem_for(x: torch.Tensor, k: int | None = None) -> Problem:
    """What dispatch looks at for a batch x (b, m, n) or one matrix (m, n): its device, dtype,
    matrix shape and batch size, and `k` where the op keeps k directions (a truncated SVD's rank,
    subspace_phi's basis width). The one place a Problem is read off a tensor, so every op's
    dispatch sees the same description of the same data."""
    return Problem(device=x.device.type, dtype=str(x.dtype).removeprefix("torch."),
                   shape=tuple(x.shape[-2:]), batch=int(x.shape[0]) if x.dim() == 3 else 1, k=k)


def check_overrides(ops: "list[Op] | tuple[Op, ...]", overrides: dict[str, str], device: str) -> None:
    """Refuse, before any work, a forced backend that no op has or that cannot run here at all
    (no device, no build, no Triton), in one line. Whether it can run each problem (dtype,
    shape) is asked per call."""
    by_name = {op.name: op for op in ops}
    for key, name in overrides.items():
        targets = [by_name[key]] if key in by_name else [op for op in ops if name in op.backends]
        if key != "*" and key not in by_name:
            raise OptionError(f"--backend {key}={name}: no op named {key!r} (ops: {', '.join(by_name)})")
        if not targets or name not in targets[0].backends:
            known = sorted({b for op in (targets or ops) for b in op.backends})
            raise OptionError(f"--backend {name}: no such backend (choose from {', '.join(known)})")
        for op in targets:
            b = op.backends[name]
            why = device_missing(device) or b.available()
            if why:
                what = f" {op.name}" if key != "*" or len(targets) == 1 else ""
                raise OptionError(f"backend '{name}' cannot run{what} here: {why}")
