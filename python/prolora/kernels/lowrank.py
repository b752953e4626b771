"""Tall-skinny expansions out_a = U1 C1 and out_b = X + U2 C2 + U1 C3 in one pass over the row
tiles of U1, U2 (m x k, any float dtype) and X (m x r): the second half of every projection
P_U X = U (U^T X), Q_U X = X - U (U^T X), where the small k x r coefficients C come from tn().

U1's tile is loaded once for both outputs; everything is accumulated in IEEE float32. The rank
is tiled (BR columns per program), so r = 1..256 and beyond (conv LoRAs' flattened r x (c kh kw)
down factors included) run in bounded tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import (INTERP_TILE, autotune, check_device, check_grid, elem_bytes, interp_meta, launch,
                      next_pow2, shape_class)

# BR is the rank tile: a program computes BR columns of the outputs, so any rank runs (r = 256
# is 4 to 16 rank tiles) in a bounded tile, whatever the device's shared memory. The dots are
# float32 IEEE (FMA units, operands in registers): K tiles of 16 keep every configuration free
# of register spills for float16/bfloat16/float32 bases (the AOT check, aot.py).
_CONFIGS = [
    dict(BM=64, BK=16, BR=16, num_warps=4, num_stages=3),
    dict(BM=128, BK=16, BR=16, num_warps=4, num_stages=3),
    dict(BM=64, BK=16, BR=32, num_warps=4, num_stages=3),
    dict(BM=128, BK=16, BR=32, num_warps=8, num_stages=3),
    dict(BM=64, BK=16, BR=64, num_warps=4, num_stages=3),
    dict(BM=128, BK=16, BR=64, num_warps=8, num_stages=4),
]


def _terms(args: dict) -> tuple[int, int]:
    """(U tiles, coefficient tiles) that one k-step of _expand_kernel loads for these flags."""
    write_a, write_b, has_u2 = bool(args["WRITE_A"]), bool(args["WRITE_B"]), bool(args["HAS_U2"])
    u = 1 + (write_b and has_u2)
    c = write_a + write_b + (write_b and has_u2)
    return u, c


def expand_shared(config: dict, args: dict) -> int:
    """Upper bound of _expand_kernel's shared memory (bytes): num_stages buffers of the U tiles
    (counted as float32: they are upcast before the dot) and the float32 coefficient tiles, or
    the two float32 accumulator tiles if the epilogue's layout change needs more."""
    u, c = _terms(args)
    bm, bk, br = config["BM"], config["BK"], config["BR"]
    ops = u * bm * bk * max(4, elem_bytes(args["u1"])) + c * bk * br * 4
    return max(config["num_stages"] * ops, 2 * bm * br * 4)


def expand_keeps(config: dict, args: dict) -> bool:
    """Rank tiles no wider than the rank needs (a 64-wide tile for r = 4 would be 94% padding)."""
    return config["BR"] <= next_pow2(int(args["R"]))


# autotune keys: the classes of k and r (shape_class) and the flags; M changes the time, not
# which tile is best. Not specialized on.
EXPAND_KEY = ("KC", "RC", "HAS_U2", "WRITE_A", "WRITE_B", "SUM")


@autotune(_CONFIGS, key=list(EXPAND_KEY), name="expand", shared=expand_shared, keep=expand_keeps)
@triton.jit(do_not_specialize=["KC", "RC"])
def _expand_kernel(u1, u2, x, c1, c2, c3, oa, ob, M, K, R,
                   su1b, su1m, su1k, su2b, su2m, su2k, sxb, sxm, sxr, scb, sck, scr,
                   soab, soam, soar, sobb, sobm, sobr, KC, RC,
                   BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, HAS_U2: tl.constexpr,
                   HAS_X: tl.constexpr, WRITE_A: tl.constexpr, WRITE_B: tl.constexpr,
                   SUM: tl.constexpr):
    # program -> (matrix b, row tile pm, rank tile pr), rank tiles fastest (neighbouring
    # programs read the same U rows); the batch is folded into grid axis 0
    nr = tl.cdiv(R, BR)
    per_b = tl.cdiv(M, BM) * nr
    pid = tl.program_id(0)
    b = (pid // per_b).to(tl.int64)
    rest = pid % per_b
    pm = rest // nr
    pr = rest % nr
    rm = pm * BM + tl.arange(0, BM)
    rr = pr * BR + tl.arange(0, BR)
    rk = tl.arange(0, BK)
    acc_a = tl.zeros((BM, BR), dtype=tl.float32)
    acc_b = tl.zeros((BM, BR), dtype=tl.float32)
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


def _coefficients(b: int, K: int, R: int, device, *cs: torch.Tensor | None,
                  need: tuple[bool, bool, bool]) -> list[torch.Tensor]:
    """C1, C2, C3 as contiguous float32 (b, K, R) (the kernel reads them with one set of
    strides): a needed term that is missing is zeros; one the flags never read is passed as
    another coefficient's pointer (no allocation)."""
    out = [c.to(torch.float32).contiguous() if c is not None else None for c in cs]
    for i, (c, needed) in enumerate(zip(out, need)):
        if c is None and needed:
            out[i] = torch.zeros(b, K, R, dtype=torch.float32, device=device)
    stand_in = next((c for c in out if c is not None), None)
    if stand_in is None:  # nothing is written: any tensor of the right shape will do
        stand_in = torch.empty(0, device=device).as_strided((b, K, R), (0, 0, 0))
    return [c if c is not None else stand_in for c in out]


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
    c1, c2, c3 = _coefficients(b, K, R, u1.device, c1 if write_a or add else None,
                               c2 if write_b and u2 is not None else None, c3 if write_b else None,
                               need=(write_a or add, write_b and u2 is not None, write_b))
    u2_ = u2 if u2 is not None else u1
    x_ = x if x is not None else u1
    oa = out_a if out_a is not None else ref
    ob = out_b if out_b is not None else ref
    sx = x.stride() if x is not None else (0, 0, 0)
    meta = interp_meta("expand", BM=INTERP_TILE, BK=INTERP_TILE, BR=INTERP_TILE)
    if b == 0 or M == 0 or R == 0:
        return
    grid = lambda m: (check_grid(b * triton.cdiv(M, m["BM"]) * triton.cdiv(R, m["BR"]), "expand"),)  # noqa: E731
    launch(_expand_kernel, grid, "expand", EXPAND_KEY, u1, u2_, x_, c1, c2, c3, oa, ob, M, K, R,
           *u1.stride(), *u2_.stride(), *sx, *c1.stride(), *oa.stride(), *ob.stride(),
           KC=shape_class(K), RC=shape_class(R), HAS_U2=u2 is not None, HAS_X=x is not None,
           WRITE_A=write_a or add, WRITE_B=write_b, SUM=add, **meta)
