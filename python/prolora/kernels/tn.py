"""Batched transposed products C = A^T X with float32 accumulation: the one GEMM shape that the
basis (Gram matrices W W^T / W^T W, the other side W^T Q), the similarity (U_s^T U_t and its
squared Frobenius norm) and the projection (U^T B) all need.

Every matrix of a batch is computed by the same tiles in the same order, whatever the batch
size, and nothing is accumulated across programs (no atomics): a layer's result does not
depend on which layers share its launch. float16/bfloat16 pairs go to the tensor cores with
float32 accumulation (their products are exact in float32); any other mix is upcast to float32
and multiplied in IEEE float32 (no TF32), as torch does by default.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import (INTERP_TILE, autotune, check_device, check_grid, elem_bytes, interp_meta, interpreting,
                      launch, shape_class)

# Two classes of configurations. Half-precision pairs go to the tensor cores (MMA): wide K
# tiles. Upcast launches run float32 IEEE dots on the FMA units, where every thread holds its
# operand fragments in registers: K tiles of 16 (32 for the smallest tile) keep them from
# spilling (the AOT check, aot.py, fails on any spill). Each launch autotunes over its class.
_TN_MMA = [
    dict(BP=64, BQ=64, BL=32, num_warps=4, num_stages=3),
    dict(BP=128, BQ=64, BL=32, num_warps=4, num_stages=3),
    dict(BP=64, BQ=128, BL=32, num_warps=4, num_stages=3),
    dict(BP=128, BQ=128, BL=32, num_warps=8, num_stages=3),
    dict(BP=64, BQ=32, BL=64, num_warps=4, num_stages=3),
    dict(BP=32, BQ=16, BL=128, num_warps=4, num_stages=3),
]
_TN_FMA = [
    dict(BP=64, BQ=64, BL=16, num_warps=4, num_stages=3),
    dict(BP=64, BQ=32, BL=16, num_warps=4, num_stages=3),
    dict(BP=32, BQ=32, BL=32, num_warps=4, num_stages=3),
]
_TN_CONFIGS = _TN_MMA + _TN_FMA
_GRAM_MMA = [
    dict(BT=64, BL=32, num_warps=4, num_stages=3),
    dict(BT=64, BL=64, num_warps=4, num_stages=4),
    dict(BT=128, BL=32, num_warps=8, num_stages=3),
]
_GRAM_FMA = [
    dict(BT=64, BL=16, num_warps=4, num_stages=3),
    dict(BT=128, BL=16, num_warps=8, num_stages=3),
]
_GRAM_CONFIGS = _GRAM_MMA + _GRAM_FMA


def _in(config: dict, configs: list[dict]) -> bool:
    return any(config == c for c in configs)


# Triton before 3.9 (3.6 on this project's GPU machines; CI has 3.9) spills 12-16 bytes of
# registers per thread in this FMA configuration for a float16 x bfloat16 pair (the AOT check
# for sm_90 under Triton 3.6); 3.9 does not. Such launches leave it out there.
_SPILLS_BEFORE_3_9 = _TN_FMA[0]


def _triton_before_3_9() -> bool:
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) < (3, 9)


def _half_kind(v) -> str | None:
    """"fp16" / "bf16" for a float16 / bfloat16 operand (a tensor or an AOT pointer type)."""
    name = str(v.dtype) if isinstance(v, torch.Tensor) else str(v)
    return "fp16" if name in ("torch.float16", "*fp16") else "bf16" if name in ("torch.bfloat16", "*bf16") else None


def tn_keeps(config: dict, args: dict) -> bool:
    """A launch autotunes over its class: FMA configurations for upcast (float32) dots, MMA
    ones for half-precision pairs (minus what an older Triton spills in, above)."""
    if _in(config, _TN_FMA) != bool(args["UPCAST"]):
        return False
    a, x = _half_kind(args.get("a_ptr")), _half_kind(args.get("x_ptr"))
    mixed = a is not None and x is not None and a != x
    return not (mixed and config == _SPILLS_BEFORE_3_9 and _triton_before_3_9())


def gram_keeps(config: dict, args: dict) -> bool:
    """As tn_keeps, for the Gram kernel."""
    return _in(config, _GRAM_FMA) == bool(args["UPCAST"])


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _operand_bytes(args: dict, name: str) -> int:
    """Bytes per element of a dot operand as it sits in shared memory: the loaded type, or
    float32 when the kernel upcasts (the conversion may happen before the copy to shared)."""
    return 4 if args["UPCAST"] else elem_bytes(args[name])


def tn_shared(config: dict, args: dict) -> int:
    """Upper bound of _tn_kernel's shared memory (bytes): num_stages buffers of both operand
    tiles, or the float32 accumulator tile if the epilogue's layout change needs more."""
    ops = config["BP"] * config["BL"] * _operand_bytes(args, "a_ptr") \
        + config["BL"] * config["BQ"] * _operand_bytes(args, "x_ptr")
    return max(config["num_stages"] * ops, config["BP"] * config["BQ"] * 4)


def gram_shared(config: dict, args: dict) -> int:
    """Upper bound of _gram_kernel's shared memory (bytes): as tn_shared with A on both sides."""
    ops = 2 * config["BT"] * config["BL"] * _operand_bytes(args, "a_ptr")
    return max(config["num_stages"] * ops, config["BT"] * config["BT"] * 4)


@triton.jit
def _tn_acc(a_ptr, x_ptr, L, P, Q, sal, sap, sxl, sxq, p0, q0,
            BP: tl.constexpr, BQ: tl.constexpr, BL: tl.constexpr, UPCAST: tl.constexpr):
    """The (BP, BQ) tile of A^T X at rows p0.., columns q0.., summed over all L rows."""
    rp = p0 + tl.arange(0, BP)
    rq = q0 + tl.arange(0, BQ)
    rl = tl.arange(0, BL)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for l0 in range(0, L, BL):
        ll = l0 + rl
        a = tl.load(a_ptr + rp[:, None] * sap + ll[None, :] * sal,
                    mask=(rp[:, None] < P) & (ll[None, :] < L), other=0.0)
        x = tl.load(x_ptr + ll[:, None] * sxl + rq[None, :] * sxq,
                    mask=(ll[:, None] < L) & (rq[None, :] < Q), other=0.0)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), x.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, x)
    return acc


# autotune keys: the output's shape class (PC, QC = shape_class of P, Q) and the dot's class;
# L (the reduction length) changes the time, not which tile is best. Not specialized on.
TN_KEY = ("PC", "QC", "UPCAST")
GRAM_KEY = ("LC", "DC", "UPCAST")


@autotune(_TN_CONFIGS, key=list(TN_KEY), name="tn", shared=tn_shared, keep=tn_keeps,
          reset_to_zero=["sq_ptr"])
@triton.jit(do_not_specialize=["PC", "QC"])
def _tn_kernel(a_ptr, x_ptr, c_ptr, sq_ptr, L, P, Q,
               sab, sal, sap, sxb, sxl, sxq, scb, scp, scq, sqb, PC, QC,
               BP: tl.constexpr, BQ: tl.constexpr, BL: tl.constexpr,
               UPCAST: tl.constexpr, STORE: tl.constexpr, SQ: tl.constexpr):
    # the batch is folded into grid axis 0 (2**31 - 1 programs; axis 1 would cap it at 65,535)
    nq = tl.cdiv(Q, BQ)
    ntiles = tl.cdiv(P, BP) * nq
    pid = tl.program_id(0)
    b = (pid // ntiles).to(tl.int64)
    t = pid % ntiles
    p0 = (t // nq) * BP
    q0 = (t % nq) * BQ
    acc = _tn_acc(a_ptr + b * sab, x_ptr + b * sxb, L, P, Q, sal, sap, sxl, sxq, p0, q0,
                  BP, BQ, BL, UPCAST)
    if STORE:
        rp = p0 + tl.arange(0, BP)
        rq = q0 + tl.arange(0, BQ)
        tl.store(c_ptr + b * scb + rp[:, None] * scp + rq[None, :] * scq, acc,
                 mask=(rp[:, None] < P) & (rq[None, :] < Q))
    if SQ:  # one partial sum of squares per tile, summed on the host in a fixed order
        tl.store(sq_ptr + b * sqb + t, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@autotune(_GRAM_CONFIGS, key=list(GRAM_KEY), name="gram", shared=gram_shared, keep=gram_keeps)
@triton.jit(do_not_specialize=["LC", "DC"])
def _gram_kernel(a_ptr, c_ptr, L, D, sab, sal, sad, scb, scr, scc, LC, DC,
                 BT: tl.constexpr, BL: tl.constexpr, UPCAST: tl.constexpr):
    # program t of matrix b computes lower-triangle tile (ti, tj), ti >= tj,
    # t = ti (ti + 1) / 2 + tj; the batch is folded into grid axis 0
    nt = tl.cdiv(D, BT)
    ntri = nt * (nt + 1) // 2
    pid = tl.program_id(0)
    b = (pid // ntri).to(tl.int64)
    t = pid % ntri
    ti = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    ti = tl.where((ti + 1) * (ti + 2) // 2 <= t, ti + 1, ti)
    ti = tl.where(ti * (ti + 1) // 2 > t, ti - 1, ti)
    tj = t - ti * (ti + 1) // 2
    a = a_ptr + b * sab
    acc = _tn_acc(a, a, L, D, D, sal, sad, sal, sad, ti * BT, tj * BT, BT, BT, BL, UPCAST)
    rr = ti * BT + tl.arange(0, BT)
    rc = tj * BT + tl.arange(0, BT)
    mask = (rr[:, None] < D) & (rc[None, :] < D)
    c = c_ptr + b * scb
    # the lower triangle as computed, the upper one as its mirror: the output is exactly
    # symmetric by construction, even where the dot of a diagonal tile is not (numpy's BLAS
    # under the interpreter). Below the diagonal (ti > tj) both masks are the full tile.
    tl.store(c + rr[:, None] * scr + rc[None, :] * scc, acc, mask=mask & (rr[:, None] >= rc[None, :]))
    tl.store(c + rc[None, :] * scr + rr[:, None] * scc, acc, mask=mask & (rr[:, None] > rc[None, :]))


def _upcast(*ts: torch.Tensor) -> bool:
    """Whether the dot upcasts its operands to float32 (IEEE): anything but a float16 or
    bfloat16 pair. Under the interpreter a bfloat16 pair is upcast too: its emulated bfloat16
    tl.dot is wrong (rel. error ~1e9 in Triton 3.9, docs/performance.md), while products of
    bfloat16 values are exact in float32, so the upcast computes what the tensor cores would;
    the bfloat16 tensor-core path itself is checked by the AOT compile and on a GPU."""
    d = ts[0].dtype
    if interpreting() and d == torch.bfloat16:
        return True
    return not (d in _LOW_PRECISION and all(t.dtype == d for t in ts))


def _batched(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"{what}: expected (b, L, P) or (L, P), got shape {tuple(t.shape)}")
    return t


def tn(a: torch.Tensor, x: torch.Tensor, *, store: bool = True,
       squares: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """C = A^T X for A (b, L, P) and X (b, L, Q) (or 2-D, any strides), float32 (b, P, Q).

    squares: also return ||C_i||_F^2 per matrix (float64, (b,)), summed from per-tile partials
    in a fixed order. store=False skips writing C (when only the norms are wanted).
    """
    squeeze = a.dim() == 2
    a, x = _batched(a, "tn: A"), _batched(x, "tn: X")
    check_device(a, x)
    b, L, P = a.shape
    if x.shape[:2] != (b, L):
        raise ValueError(f"tn: A {tuple(a.shape)} and X {tuple(x.shape)} do not match")
    Q = x.shape[2]
    c = torch.empty(b, P, Q, dtype=torch.float32, device=a.device) if store else None
    meta = interp_meta("tn", BP=INTERP_TILE, BQ=INTERP_TILE, BL=INTERP_TILE)
    # partial sums: one slot per tile of the config with the most tiles, zeroed before each
    # run (the autotuner runs several configs), so unused slots add nothing. Without squares a
    # one-element scratch stands in: the autotuner zeroes whatever is passed as sq_ptr.
    sq = torch.zeros(b if squares else 1, _max_tiles(P, Q, meta) if squares else 1, dtype=torch.float32,
                     device=a.device)
    if b and P and Q:
        grid = lambda m: (check_grid(b * triton.cdiv(P, m["BP"]) * triton.cdiv(Q, m["BQ"]), "tn"),)  # noqa: E731
        cs = c.stride() if c is not None else (0, 0, 0)
        launch(_tn_kernel, grid, "tn", TN_KEY, a, x, c if c is not None else sq, sq, L, P, Q,
               *a.stride(), *x.stride(), *cs, sq.stride(0), PC=shape_class(P), QC=shape_class(Q),
               UPCAST=_upcast(a, x), STORE=store, SQ=squares, **meta)
    norms = sq.double().sum(dim=1) if squares else None
    if squeeze:
        return (c[0] if c is not None else None), (norms[0] if norms is not None else None)
    return c, norms


def _max_tiles(P: int, Q: int, meta: dict) -> int:
    """Tiles of the (P, Q) output under the configuration with the most (the interpreter's
    included): the slots of the per-tile partial sums."""
    shapes = [(meta["BP"], meta["BQ"])] if meta else []
    shapes += [(c["BP"], c["BQ"]) for c in _TN_CONFIGS]
    return max(triton.cdiv(P, bp) * triton.cdiv(Q, bq) for bp, bq in shapes)


def gram(a: torch.Tensor) -> torch.Tensor:
    """G = A^T A for A (b, L, D) (or 2-D, any strides): float32 (b, D, D), symmetric, from the
    lower-triangle tiles only (half the multiply-adds of a general product)."""
    squeeze = a.dim() == 2
    a = _batched(a, "gram")
    check_device(a)
    b, L, D = a.shape
    c = torch.empty(b, D, D, dtype=torch.float32, device=a.device)
    meta = interp_meta("gram", BT=INTERP_TILE, BL=INTERP_TILE)
    if b and D:
        def grid(m):
            nt = triton.cdiv(D, m["BT"])
            return (check_grid(b * (nt * (nt + 1) // 2), "gram"),)

        launch(_gram_kernel, grid, "gram", GRAM_KEY, a, c, L, D, *a.stride(), *c.stride(),
               LC=shape_class(L), DC=shape_class(D), UPCAST=_upcast(a), **meta)
    return c[0] if squeeze else c
