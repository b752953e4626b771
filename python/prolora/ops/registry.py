"""Operator registry: each op is declared once; backends register implementations with an
eligibility check, and dispatch says which backend it chose and why it rejected the others."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import OptionError

ENV_VAR = "PROLORA_BACKEND"


@dataclass(frozen=True)
class Problem:
    """What dispatch looks at: where the data lives and how big the job is."""

    device: str = "cpu"
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    batch: int = 1
    k: int | None = None


@dataclass
class Backend:
    name: str
    fn: Callable[..., Any]
    # None when the backend can run `problem`, else a one-line reason
    check: Callable[[Problem], str | None]
    priority: int = 0
    reference: bool = False
    # None when the backend can run on this machine at all, else why not (no GPU, no build, ...)
    available: Callable[[], str | None] = lambda: None


@dataclass
class Choice:
    backend: Backend
    rejected: dict[str, str] = field(default_factory=dict)


class Op:
    """A named operation with a reference implementation and optional fast ones."""

    def __init__(self, name: str, doc: str):
        self.name = name
        self.doc = doc
        self.backends: dict[str, Backend] = {}

    def register(self, name: str, *, priority: int = 0, reference: bool = False,
                 check: Callable[[Problem], str | None] | None = None,
                 available: Callable[[], str | None] | None = None):
        def deco(fn):
            self.backends[name] = Backend(name, fn, check or (lambda p: None), priority, reference,
                                          available or (lambda: None))
            return fn

        return deco

    @property
    def reference(self) -> Backend:
        return next(b for b in self.backends.values() if b.reference)

    def choose(self, problem: Problem, override: str | None = None) -> Choice:
        """Pick the highest-priority eligible backend, or `override` if it is eligible."""
        rejected: dict[str, str] = {}
        no_device = device_missing(problem.device)
        for b in self.backends.values():
            why = no_device or b.available() or b.check(problem)
            if why:
                rejected[b.name] = why
        if override:
            if override not in self.backends:
                raise OptionError(f"op {self.name} has no backend '{override}' "
                                  f"(choose from {', '.join(self.backends)})")
            if override in rejected:
                raise OptionError(f"backend '{override}' cannot run {self.name} here: {rejected[override]}")
            chosen = self.backends[override]
        else:
            ok = [b for b in self.backends.values() if b.name not in rejected]
            if not ok:
                raise OptionError(f"no backend of {self.name} can run this problem: {rejected}")
            chosen = max(ok, key=lambda b: b.priority)
        for b in self.backends.values():
            if b is not chosen and b.name not in rejected:
                rejected[b.name] = f"eligible, lower priority than {chosen.name}" if not override else "not requested"
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
