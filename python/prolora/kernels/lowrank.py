"""Tall-skinny expansions out_a = U1 C1 and out_b = X + U2 C2 + U1 C3 in one pass over the row
tiles of U1, U2 (m x k, any float dtype) and X (m x r): the second half of every projection
P_U X = U (U^T X), Q_U X = X - U (U^T X), where the small k x r coefficients C come from tn().

U1's tile is loaded once for both outputs; everything is accumulated in IEEE float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import INTERP_TILE, autotune, check_device, interp_meta, next_pow2

_CONFIGS = [
    dict(BM=64, BK=32, num_warps=4, num_stages=3),
    dict(BM=128, BK=32, num_warps=4, num_stages=3),
    dict(BM=64, BK=64, num_warps=4, num_stages=3),
    dict(BM=128, BK=64, num_warps=8, num_stages=3),
    dict(BM=32, BK=64, num_warps=2, num_stages=4),
]


@autotune(_CONFIGS, key=["M", "K", "RP", "HAS_U2", "WRITE_B"])
@triton.jit
def _expand_kernel(u1, u2, x, c1, c2, c3, oa, ob, M, K, R,
                   su1b, su1m, su1k, su2b, su2m, su2k, sxb, sxm, sxr, scb, sck, scr,
                   soab, soam, soar, sobb, sobm, sobr,
                   BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, HAS_U2: tl.constexpr,
                   HAS_X: tl.constexpr, WRITE_A: tl.constexpr, WRITE_B: tl.constexpr,
                   SUM: tl.constexpr):
    pm = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rm = pm * BM + tl.arange(0, BM)
    rr = tl.arange(0, RP)
    rk = tl.arange(0, BK)
    acc_a = tl.zeros((BM, RP), dtype=tl.float32)
    acc_b = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        mk = (rm[:, None] < M) & (kk[None, :] < K)
        kr = (kk[:, None] < K) & (rr[None, :] < R)
        cofs = b * scb + kk[:, None] * sck + rr[None, :] * scr
        t1 = tl.load(u1 + b * su1b + rm[:, None] * su1m + kk[None, :] * su1k, mask=mk, other=0.0)
        t1 = t1.to(tl.float32)
        if WRITE_A:
            acc_a += tl.dot(t1, tl.load(c1 + cofs, mask=kr, other=0.0), input_precision="ieee")
        if WRITE_B:
            acc_b += tl.dot(t1, tl.load(c3 + cofs, mask=kr, other=0.0), input_precision="ieee")
            if HAS_U2:
                t2 = tl.load(u2 + b * su2b + rm[:, None] * su2m + kk[None, :] * su2k, mask=mk, other=0.0)
                acc_b += tl.dot(t2.to(tl.float32), tl.load(c2 + cofs, mask=kr, other=0.0),
                                input_precision="ieee")
    mr = (rm[:, None] < M) & (rr[None, :] < R)
    if WRITE_B and HAS_X:
        acc_b += tl.load(x + b * sxb + rm[:, None] * sxm + rr[None, :] * sxr, mask=mr, other=0.0).to(tl.float32)
    if SUM:
        tl.store(oa + b * soab + rm[:, None] * soam + rr[None, :] * soar, acc_a + acc_b, mask=mr)
    else:
        if WRITE_A:
            tl.store(oa + b * soab + rm[:, None] * soam + rr[None, :] * soar, acc_a, mask=mr)
        if WRITE_B:
            tl.store(ob + b * sobb + rm[:, None] * sobm + rr[None, :] * sobr, acc_b, mask=mr)


def expand(u1: torch.Tensor, c1: torch.Tensor | None, *, out_a: torch.Tensor | None = None,
           u2: torch.Tensor | None = None, c2: torch.Tensor | None = None,
           c3: torch.Tensor | None = None, x: torch.Tensor | None = None,
           out_b: torch.Tensor | None = None, add: bool = False) -> None:
    """Writes out_a = U1 C1 and/or out_b = X + U2 C2 + U1 C3 (batched: U (b, m, k), C (b, k, r)
    float32, X and outputs (b, m, r), outputs float32 with any strides). add=True writes the sum
    of both into out_a (out_b unused). A missing term is zero; an output not given is skipped."""
    check_device(u1)
    b, M, K = u1.shape
    write_a = out_a is not None
    write_b = out_b is not None or add
    ref = out_a if out_a is not None else out_b
    R = ref.shape[2]
    zeros = None

    def coef(c: torch.Tensor | None) -> torch.Tensor:
        nonlocal zeros
        if c is None:
            if zeros is None:
                zeros = torch.zeros(b, K, R, dtype=torch.float32, device=u1.device)
            return zeros
        return c.to(torch.float32).contiguous()

    c1, c2, c3 = coef(c1), coef(c2), coef(c3)
    u2_ = u2 if u2 is not None else u1
    x_ = x if x is not None else u1
    oa = out_a if out_a is not None else ref
    ob = out_b if out_b is not None else ref
    sx = x.stride() if x is not None else (0, 0, 0)
    meta = interp_meta(BM=INTERP_TILE, BK=INTERP_TILE)
    if b == 0 or M == 0 or R == 0:
        return
    grid = lambda m: (triton.cdiv(M, m["BM"]), b)  # noqa: E731
    _expand_kernel[grid](u1, u2_, x_, c1, c2, c3, oa, ob, M, K, R,
                         *u1.stride(), *u2_.stride(), *sx, *c1.stride(), *oa.stride(), *ob.stride(),
                         RP=next_pow2(R), HAS_U2=u2 is not None, HAS_X=x is not None,
                         WRITE_A=write_a or add, WRITE_B=write_b, SUM=add, **meta)
