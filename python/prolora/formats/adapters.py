"""Adapters that are not a plain low-rank pair, read as the LoRA their effective dW is (or is
nearest to): LyCORIS LoKr, LoHa, LoCon with a Tucker core, full differences, and DoRA in its two
conventions. Each dW is the one the adapter's own library applies in its forward pass (LyCORIS
`modules/*.py` get_weight / make_weight, peft `tuners/lora/dora.py`; ComfyUI's weight adapters
agree), with the module's scale folded in:

| kind | tensors (suffixes of one module key) | dW |
|---|---|---|
| LoCon Tucker | `lora_down.weight` [r, in, 1, 1], `lora_mid.weight` [r, r, kh, kw], `lora_up.weight` [out, r, 1, 1] | up x_1 mid x_2 down (a conv LoRA of rank r: exact) |
| LoHa | `hada_w1_a` [out, r], `hada_w1_b` [r, in'], `hada_w2_a`, `hada_w2_b`; Tucker: `hada_t1/t2` [r, r, kh, kw] with `hada_w*_a` [r, out], `hada_w*_b` [r, in] | (w1a w1b) * (w2a w2b) * alpha / r, r = w1b rows |
| LoKr | `lokr_w1` [a, c] or `lokr_w1_a` [a, r] @ `lokr_w1_b` [r, c]; `lokr_w2` [b, d(, kh, kw)] or `lokr_w2_a` [b, r] @ `lokr_w2_b` [r, d'] or Tucker `lokr_t2` [r, r, kh, kw] with `lokr_w2_a` [r, b], `lokr_w2_b` [r, d] | kron(w1, w2) * alpha / r, r = the factored side's rank (w2's if both); scale 1 when neither side is factored |
| full | `diff` (the weight's shape), `diff_b` (the bias's) | diff; diff_b is carried as the module's bias delta |
| DoRA | LyCORIS/kohya `dora_scale` [out, 1, ...] or [1, in, ...] beside any of the above or a LoRA pair; PEFT `lora_magnitude_vector` [out] | (m / ||W + D||) (W + D) - W on the SOURCE weight W, D the inner adapter's dW; the norm per output row (PEFT, LyCORIS wd_on_out) or per input column (LyCORIS' other axis), LyCORIS adding float32 eps |

LoKr, LoHa and full differences become a LoRA here (formats/lowrank.py picks the rank by the error
bound). A DoRA module keeps its inner LoRA and its magnitude: its dW needs the source weight, so
the engine forms it (`realize_dora`) when it has that weight; nothing here reads a base model.
"""
from __future__ import annotations

import math

import torch

from ..errors import InvalidLoraError, UnsupportedFormatError
from ..lora import LoraModule
from .common import ALPHA, BIAS, DOWN, UP, alpha_value, all_finite, check_pair
from .lowrank import Conversion, from_dense, from_factors, khatri_rao, kron_lowrank

MID, DORA, MAGNITUDE, DIFF, DIFF_B = "mid", "dora_scale", "magnitude", "diff", "diff_b"
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
KINDS = {"loha": set(LOHA), "lokr": set(LOKR), "full": {DIFF, DIFF_B}, "lora": {DOWN, UP, MID, BIAS}}
PLAIN = {DOWN, UP, ALPHA, BIAS}
# the largest dW (out x in*kh*kw elements) an adapter may imply: twice the largest LoRA-able weight
# of any model prolora reads (Wan's 13824 x 5120 ffn), so a tiny hostile file cannot ask for more
MAX_ELEMENTS = 1 << 27


def _bad(path: object, what: str) -> InvalidLoraError:
    return InvalidLoraError(f"{path}: {what}")


class _Parts:
    """One module's tensors by role, each checked as it is taken."""

    def __init__(self, path: object, module: str, parts: dict[str, tuple[str, torch.Tensor]]):
        self.path, self.module, self.parts = path, module, parts

    def key(self, role: str) -> str:
        return self.parts[role][0]

    def has(self, role: str) -> bool:
        return role in self.parts

    def get(self, role: str, dims: tuple[int, ...] = (2,)) -> torch.Tensor:
        key, t = self.parts[role]
        if not t.is_floating_point():
            raise _bad(self.path, f"'{key}' has dtype {t.dtype}; adapter weights must be floating point")
        if t.dim() not in dims or t.numel() == 0:
            want = " or ".join(f"{d}-D" for d in dims)
            raise _bad(self.path, f"'{key}' has shape {tuple(t.shape)}; expected a non-empty {want} tensor")
        if not all_finite(t):
            raise _bad(self.path, f"'{key}' contains NaN or Inf values")
        return t

    def need(self, *roles: str) -> None:
        missing = [r for r in roles if r not in self.parts]
        if missing:
            have = next(iter(self.parts.values()))[0]
            raise _bad(self.path, f"module '{self.module}' ('{have}') lacks its {', '.join(missing)} tensor(s)")

    def fits(self, cond: bool, *roles: str) -> None:
        if not cond:
            shapes = ", ".join(f"'{self.key(r)}' {tuple(self.parts[r][1].shape)}" for r in roles if r in self.parts)
            raise _bad(self.path, f"module '{self.module}': shapes do not fit together: {shapes}")


def kind_of(path: object, module: str, roles: set[str]) -> str:
    """The adapter kind a module's tensor roles make, refusing a mix of two kinds."""
    kinds = [k for k, rs in KINDS.items() if roles & rs]
    if len(kinds) > 1:
        raise _bad(path, f"module '{module}' mixes {kinds[0]} and {kinds[1]} tensors; one adapter per module")
    if not kinds:
        raise _bad(path, f"module '{module}' has a DoRA magnitude or an alpha but no adapter weights")
    return kinds[0]


def _limit(p: _Parts, out: int, inn: int, role: str) -> None:
    if out * inn > MAX_ELEMENTS:
        raise _bad(p.path, f"module '{p.module}': '{p.key(role)}' implies a {out} x {inn} update, larger than "
                   "any weight of a model prolora reads")


def build(path: object, module: str, parts: dict[str, tuple[str, torch.Tensor]], conv: Conversion) -> LoraModule:
    """The LoraModule of one adapter module (roles beyond a plain pair), validated."""
    if DIFF_B in parts and DIFF not in parts:  # a bias delta beside a LoRA pair (ComfyUI's `.diff_b`)
        if BIAS in parts:
            raise _bad(path, f"module '{module}' has two bias deltas, '{parts[BIAS][0]}' and '{parts[DIFF_B][0]}'")
        parts = {(BIAS if r == DIFF_B else r): v for r, v in parts.items()}
    p = _Parts(path, module, parts)
    roles = set(parts) - {ALPHA, DORA, MAGNITUDE}
    kind = kind_of(path, module, roles)
    alpha = alpha_value(path, p.key(ALPHA), parts[ALPHA][1]) if ALPHA in parts else None
    dora = p.has(DORA) or p.has(MAGNITUDE)
    if p.has(DORA) and p.has(MAGNITUDE):
        raise _bad(path, f"module '{module}' has both a LyCORIS dora_scale and a PEFT magnitude vector")
    inner = conv.tighter() if dora else conv
    if kind == "lora":
        lm = _lora(p, alpha)
    elif kind == "loha":
        lm = _loha(p, alpha, inner)
    elif kind == "lokr":
        lm = _lokr(p, alpha, inner)
    else:
        if dora:
            raise _bad(path, f"module '{module}': a full difference carries no DoRA magnitude")
        lm = _full(p, conv)
    if dora:
        _attach_magnitude(p, lm)
    return lm


def _lora(p: _Parts, alpha: float | None) -> LoraModule:
    p.need(DOWN, UP)
    down, up = p.parts[DOWN][1], p.parts[UP][1]
    bias = p.parts[BIAS][1] if p.has(BIAS) else None
    kind = "lora"
    if p.has(MID):
        mid = p.get(MID, (4,))
        p.get(DOWN, (4,))
        p.get(UP, (4,))
        r = down.shape[0]
        p.fits(tuple(down.shape[2:]) == (1, 1) and tuple(up.shape[2:]) == (1, 1) and up.shape[1] == mid.shape[0]
               and mid.shape[1] == r, DOWN, MID, UP)
        _limit(p, up.shape[0], down.shape[1] * mid.shape[2] * mid.shape[3], MID)
        # down'[m, i, h, w] = sum_n mid[m, n, h, w] down[n, i]: a conv LoRA of rank mid.shape[0] (exact)
        down = torch.einsum("mnhw,ni->mihw", mid.double(), down.double().flatten(1)).float()
        up = up.float()
        if alpha is not None:  # the scale is alpha / down's rank; keep it for the new rank
            alpha = alpha / r * down.shape[0]
        kind = "locon-tucker"
    check_pair(p.path, p.module, down, up, p.key(DOWN), p.key(UP), bias, p.key(BIAS) if bias is not None else "")
    return LoraModule(p.module, down, up, alpha, bias, kind=kind)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Tucker-rebuilt conv factor einsum('ijkl,jr,ip->prkl', t, wb, wa) as (left [out, r],
    right [r, in*kh*kw]): left = wa^T, right[i] = sum_j t[i, j] wb[j]."""
    right = torch.einsum("ijkl,jr->irkl", t.double(), wb.double())
    return wa.double().T, right.reshape(right.shape[0], -1)


def _loha(p: _Parts, alpha: float | None, conv: Conversion) -> LoraModule:
    p.need(*LOHA[:4])
    w1a, w1b, w2a, w2b = (p.get(r) for r in LOHA[:4])
    rank = w1b.shape[0]
    scale = 1.0 if alpha is None else alpha / rank
    if p.has("hada_t1") or p.has("hada_t2"):
        p.need("hada_t1", "hada_t2")
        t1, t2 = p.get("hada_t1", (4,)), p.get("hada_t2", (4,))
        p.fits(t1.shape[0] == w1a.shape[0] and t1.shape[1] == w1b.shape[0] and t2.shape[0] == w2a.shape[0]
               and t2.shape[1] == w2b.shape[0] and w1a.shape[1] == w2a.shape[1] and w1b.shape[1] == w2b.shape[1]
               and t1.shape[2:] == t2.shape[2:], *LOHA)
        out, kernel = w1a.shape[1], tuple(t1.shape[2:])
        _limit(p, out, w1b.shape[1] * math.prod(kernel), "hada_t1")
        (a1, b1), (a2, b2) = _tucker(t1, w1a, w1b), _tucker(t2, w2a, w2b)
    else:
        p.fits(w1a.shape[1] == w1b.shape[0] and w2a.shape[1] == w2b.shape[0] and w1a.shape[0] == w2a.shape[0]
               and w1b.shape[1] == w2b.shape[1], *LOHA[:4])
        out, kernel = w1a.shape[0], ()
        _limit(p, out, w1b.shape[1], "hada_w1_b")
        a1, b1, a2, b2 = w1a, w1b, w2a, w2b
    if a1.shape[1] * a2.shape[1] >= min(a1.shape[0], b1.shape[1]):  # no thinner than dense: multiply out
        up, down, err = from_dense((a1.double() @ b1.double()) * (a2.double() @ b2.double()) * scale, conv)
    else:
        up, down, err = from_factors(*khatri_rao(a1 * scale, b1, a2, b2), conv)
    return _module(p, up, down, kernel, "loha", err)


def _lokr(p: _Parts, alpha: float | None, conv: Conversion) -> LoraModule:
    if p.has("lokr_w1"):
        w1 = p.get("lokr_w1").double()
        r1 = None
    else:
        p.need("lokr_w1_a", "lokr_w1_b")
        w1a, w1b = p.get("lokr_w1_a"), p.get("lokr_w1_b")
        p.fits(w1a.shape[1] == w1b.shape[0], "lokr_w1_a", "lokr_w1_b")
        _limit(p, w1a.shape[0], w1b.shape[1], "lokr_w1_b")
        w1, r1 = w1a.double() @ w1b.double(), w1b.shape[0]
    if p.has("lokr_w2"):
        w2 = p.get("lokr_w2", (2, 4)).double()
        r2 = None
    elif p.has("lokr_t2"):
        p.need("lokr_w2_a", "lokr_w2_b")
        t2, w2a, w2b = p.get("lokr_t2", (4,)), p.get("lokr_w2_a"), p.get("lokr_w2_b")
        p.fits(t2.shape[0] == w2a.shape[0] and t2.shape[1] == w2b.shape[0], "lokr_t2", "lokr_w2_a", "lokr_w2_b")
        _limit(p, w2a.shape[1], w2b.shape[1] * t2.shape[2] * t2.shape[3], "lokr_t2")
        w2 = torch.einsum("ijkl,jr,ip->prkl", t2.double(), w2b.double(), w2a.double())
        r2 = w2b.shape[0]
    else:
        p.need("lokr_w2_a", "lokr_w2_b")
        w2a, w2b = p.get("lokr_w2_a"), p.get("lokr_w2_b")
        p.fits(w2a.shape[1] == w2b.shape[0], "lokr_w2_a", "lokr_w2_b")
        _limit(p, w2a.shape[0], w2b.shape[1], "lokr_w2_b")
        w2, r2 = w2a.double() @ w2b.double(), w2b.shape[0]
    rank = r2 if r2 is not None else r1  # the factored side's rank (w2's when both are), as ComfyUI reads it
    scale = 1.0 if alpha is None or rank is None else alpha / rank
    kernel = tuple(w2.shape[2:])
    out, inn = w1.shape[0] * w2.shape[0], w1.shape[1] * math.prod(w2.shape[1:])
    _limit(p, out, inn, "lokr_w2" if p.has("lokr_w2") else "lokr_w2_b")
    up, down, err = kron_lowrank(w1, w2.flatten(1), scale, conv)
    return _module(p, up, down, kernel, "lokr", err)


def _full(p: _Parts, conv: Conversion) -> LoraModule:
    p.need(DIFF)
    if p.parts[DIFF][1].dim() == 1:
        raise UnsupportedFormatError(f"{p.path}: LyCORIS norm adapter key '{p.key(DIFF)}' (a full difference of a "
                                     "1-D norm weight): norm-layer adapters change no LoRA-able weight")
    diff = p.get(DIFF, (2, 3, 4, 5))
    _limit(p, diff.shape[0], math.prod(diff.shape[1:]), DIFF)
    bias = None
    if p.has(DIFF_B):
        bias = p.get(DIFF_B, (1,))
        p.fits(bias.shape[0] == diff.shape[0], DIFF, DIFF_B)
    if diff.dim() not in (2, 4):
        raise _bad(p.path, f"'{p.key(DIFF)}' has shape {tuple(diff.shape)}; prolora transfers linear and 2-D conv "
                   "weights only")
    up, down, err = from_dense(diff.double().flatten(1), conv)
    lm = _module(p, up, down, tuple(diff.shape[2:]), "full", err)
    lm.bias = bias
    return lm


def _module(p: _Parts, up: torch.Tensor, down: torch.Tensor, kernel: tuple[int, ...], kind: str,
            err: float) -> LoraModule:
    """A converted LoRA (scale folded in, alpha None), conv-shaped when the kernel is known; a
    flattened conv factor stays 2-D and the plan shapes it to the weight (plan.fit_to_weight)."""
    k = up.shape[1]
    if kernel and math.prod(kernel) and down.shape[1] % math.prod(kernel) == 0:
        down = down.reshape(k, down.shape[1] // math.prod(kernel), *kernel)
        up = up.reshape(up.shape[0], k, 1, 1)
    if not (all_finite(up) and all_finite(down)):
        raise _bad(p.path, f"module '{p.module}': its {kind} update overflows (NaN or Inf once multiplied out)")
    return LoraModule(p.module, down.contiguous(), up.contiguous(), None, None, kind=kind, error=err)


def _attach_magnitude(p: _Parts, lm: LoraModule) -> None:
    """DoRA: a per-row (out axis) or per-column (in axis) magnitude vector."""
    if p.has(MAGNITUDE):  # PEFT: [out] (linear), [1, out, 1, 1] (conv): per output row either way
        m = p.get(MAGNITUDE, (1, 2, 3, 4, 5))
        p.fits(m.numel() == lm.out_features and sum(int(d) != 1 for d in m.shape) <= 1, MAGNITUDE)
        m = m.reshape(-1)
        axis, eps = "out", 0.0
    else:  # LyCORIS: [out, 1, ...] (wd_on_out) or [1, in, ...]
        m = p.get(DORA, (2, 3, 4, 5))
        if any(int(d) != 1 for d in m.shape[2:]) or (m.shape[0] != 1 and m.shape[1] != 1):
            raise _bad(p.path, f"'{p.key(DORA)}' has shape {tuple(m.shape)}; a dora_scale is [out, 1, ...] or "
                       "[1, in, ...]")
        axis = "out" if m.shape[1] == 1 else "in"
        m = m.reshape(-1)
        if axis == "out":
            p.fits(m.shape[0] == lm.out_features, DORA)
        eps = float(torch.finfo(torch.float32).eps)
    lm.magnitude, lm.dora_axis, lm.dora_eps = m, axis, eps
    lm.kind = "dora" if lm.kind == "lora" else f"{lm.kind}+dora"


def realize_dora(lm: LoraModule, weight: torch.Tensor, conv: Conversion) -> LoraModule:
    """The LoRA nearest a DoRA module's effective dW on `weight` (the SOURCE base weight, its own
    shape): (m / ||W + D||) (W + D) - W, D = the inner adapter's dW, truncated by the bound."""
    shape = tuple(weight.shape)
    W = weight.reshape(shape[0], -1).double()
    D = lm.scale * (lm.up.reshape(shape[0], -1).double() @ lm.down.reshape(lm.rank, -1).double())
    V = W + D
    m = lm.magnitude.double()
    if lm.dora_axis == "out":
        norm = V.norm(dim=1, keepdim=True)
        m = m.reshape(-1, 1)
    else:
        if len(shape) < 2 or m.numel() != shape[1]:
            raise InvalidLoraError(f"DoRA module '{lm.key}': its dora_scale has {m.numel()} input columns but the "
                                   f"weight has shape {shape}")
        cols = V.reshape(shape[0], shape[1], -1)
        norm = cols.pow(2).sum(dim=(0, 2)).sqrt().reshape(1, shape[1], 1)
        m = m.reshape(1, shape[1], 1)
        V = cols
    ratio = m / (norm + lm.dora_eps).clamp_min(1e-30)
    dW = (V * ratio).reshape(shape[0], -1) - W
    if not all_finite(dW):
        raise InvalidLoraError(f"DoRA module '{lm.key}': its update on the source weight is not finite")
    up, down, err = from_dense(dW, conv)
    if len(shape) == 4:
        up, down = up.reshape(shape[0], -1, 1, 1), down.reshape(-1, *shape[1:])
    return LoraModule(lm.key, down, up, None, lm.bias, kind=lm.kind, error=err)


# output formats that can carry a bias delta: peft (`lora_B.bias`), comfy (`.diff_b`, which ComfyUI adds to the bias)
BIAS_FORMATS = ("peft", "comfy")


def drop_bias_deltas(modules: dict[str, LoraModule], fmt: str) -> list[str]:
    """Full differences' bias deltas (`diff_b`) in an output format without a bias field: removed,
    with one warning naming how many and which formats keep them."""
    if fmt in BIAS_FORMATS:
        return []
    hit = [k for k, m in modules.items() if m.bias is not None and m.kind == "full"]
    for k in hit:
        modules[k].bias = None
    if not hit:
        return []
    return [f"{len(hit)} bias difference(s) (diff_b, e.g. on '{hit[0]}') dropped: the {fmt} format has no bias; "
            "--format comfy or peft keeps them"]


def refuse_base_dependent(lf, what: str) -> None:
    """Raise for a LoRA with DoRA modules in a command that reads no base weight (resize, merge,
    compare, refine): their dW is not their factors'."""
    hit = [k for k, m in lf.modules.items() if m.needs_base]
    if hit:
        more = f" (and {len(hit) - 1} more)" if len(hit) > 1 else ""
        raise UnsupportedFormatError(
            f"{lf.path or 'LoRA'}: DoRA module '{hit[0]}'{more}: its dW depends on the base weight it was trained "
            f"on, which {what} does not read; transfer it first (prolora transfer writes it as a plain LoRA)")
