"""What extract, resize and merge share beyond the method's factor SVD: the rank rules of
sd-scripts' resize (`sv_ratio`, `sv_fro`, `sv_cumulative`), reimplemented from their meaning, and
the one-alpha convention of their outputs (`uniform_alpha`).

The SVD of dW = up @ down from the factors alone (QR of each side, SVD of the small core, never a
dense m x n matrix) is method.factor_svd, the same as a transfer's compression; the factor jobs
run the core's SVD on small_svd's reference backend (EXACT: LAPACK in float64), exact on the
small cores they see and the same numbers whatever the machine's fastest backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import OptionError
from ..ops import small_svd

EXACT = small_svd.reference.name  # the core SVD's backend for resize and merge (float64 LAPACK)
RULES = ("rank", "sv_ratio", "sv_fro", "sv_cumulative")


@dataclass(frozen=True)
class RankRule:
    """How a new rank is chosen from the singular values S (descending) of a module's dW.

    kind "rank": keep `value` (an int) values. "sv_ratio": keep the values >= max(S) / value.
    "sv_fro": the smallest rank whose retained Frobenius norm sqrt(sum_{i<k} S_i^2) is at least
    the fraction `value` of ||dW||_F. "sv_cumulative": the smallest rank whose sum of singular
    values is at least the fraction `value` of their total. `max_rank` caps the dynamic rules.
    Every rule keeps at least one value (a module is never emptied) and never more than there are.
    """

    kind: str
    value: float
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise OptionError(f"unknown rank rule '{self.kind}'; use one of {', '.join(RULES)}")
        v = self.value
        if not math.isfinite(v):
            raise OptionError(f"{self.kind}: {v} is not a finite number")
        if self.kind == "rank" and (v < 1 or v != int(v)):
            raise OptionError(f"rank {v}: expected a positive integer")
        if self.kind == "sv_ratio" and v < 1:
            raise OptionError(f"sv_ratio:{v}: the ratio max(S)/S_min kept must be >= 1")
        if self.kind in ("sv_fro", "sv_cumulative") and not 0 < v <= 1:
            raise OptionError(f"{self.kind}:{v}: expected a fraction in (0, 1]")
        if self.max_rank is not None and self.max_rank < 1:
            raise OptionError(f"rank cap {self.max_rank}: expected a positive integer")

    @classmethod
    def parse(cls, spec: str, max_rank: int | None = None) -> "RankRule":
        """'sv_ratio:8', 'sv_fro:0.9', 'sv_cumulative:0.9' (sd-scripts' names) or 'rank:N'."""
        kind, sep, value = str(spec).partition(":")
        if not sep:
            raise OptionError(f"rank rule {spec!r}: expected KIND:VALUE with KIND one of {', '.join(RULES)}")
        try:
            v = float(value)
        except ValueError:
            raise OptionError(f"rank rule {spec!r}: {value!r} is not a number") from None
        return cls(kind.strip(), v, max_rank)

    def spec(self) -> str:
        v = int(self.value) if self.kind == "rank" else self.value
        return f"{self.kind}:{v}" + (f",max_rank:{self.max_rank}" if self.max_rank is not None and self.kind != "rank" else "")

    def choose(self, S: torch.Tensor) -> int:
        """The new rank for singular values S (descending, non-negative)."""
        d = int(S.numel())
        if d == 0:
            return 0
        S = S.double()
        if self.kind == "rank":
            k = int(self.value)
        elif float(S[0]) == 0.0:
            k = 1
        elif self.kind == "sv_ratio":
            k = int((S >= float(S[0]) / self.value).sum())
        elif self.kind == "sv_fro":
            frac = (S ** 2).cumsum(0).sqrt() / float((S ** 2).sum().sqrt())
            k = _first_at_least(frac, self.value)
        else:  # sv_cumulative
            frac = S.cumsum(0) / float(S.sum())
            k = _first_at_least(frac, self.value)
        if self.max_rank is not None:
            k = min(k, self.max_rank)
        return max(1, min(k, d))


def _first_at_least(frac: torch.Tensor, f: float) -> int:
    """The smallest k (1-based) with frac[k-1] >= f, tolerating round-off at the top (frac[-1] ~ 1)."""
    hit = torch.nonzero(frac >= f - 1e-12 * max(1.0, f)).flatten()
    return int(hit[0]) + 1 if hit.numel() else int(frac.numel())


def uniform_alpha(modules: dict, alpha: float | None = None) -> dict:
    """The same modules rewritten with one alpha A for all: a module of rank r and scale s gets
    alpha A and up * s * r / A, so that A / r * up' @ down = s * up @ down (the same dW).

    Why: diffusers (0.42) mis-scales kohya SD1.x files whose modules have different alphas (its
    converter keys the alpha pattern under names peft never matches, so every module gets the
    most common alpha). One alpha is read the same by every loader. A defaults to the most
    common alpha (rank where a module has none), whose modules keep their factors bit for bit."""
    from collections import Counter

    from ..lora import LoraModule

    if not modules:
        return modules
    if alpha is None:
        alpha = Counter(float(m.rank if m.alpha is None else m.alpha) for m in modules.values()).most_common(1)[0][0]
    A = float(alpha)
    out = {}
    for key, m in modules.items():
        up = m.up
        factor = m.scale * m.rank / A  # the module's own scale, folded with r / A
        if factor != 1.0:
            up = (m.up.double() * factor).to(m.up.dtype)
        out[key] = LoraModule(m.key, m.down, up, A, m.bias)
    return out
