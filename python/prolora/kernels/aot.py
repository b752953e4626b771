"""Ahead-of-time compile of every kernel variant for a CUDA target, without a GPU: the check that
the kernels lower through Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin, with
ptxas), which the interpreter never exercises (it skips layouts, dtypes of tl.dot operands,
shared memory limits). Must run without TRITON_INTERPRET.

    python -m prolora.kernels.aot [ARCH ...]      # default 90 (Hopper); 80 for Ampere
"""
from __future__ import annotations

import sys

from ._config import interpreting

_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _compile(jit_fn, arch: int, ptr_types: dict[str, str], constexprs: dict[str, object]) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = jit_fn.arg_names
    sig = {n: "constexpr" if n in constexprs else ptr_types.get(n, "i32") for n in names}
    src = ASTSource(fn=jit_fn, signature=sig,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    return len(kernel.asm["cubin"])


def variants():
    """(label, kernel, pointer types, constexprs) for each specialization the launchers use."""
    from . import lowrank, tn

    out = []
    for dt, upcast in (("fp16", False), ("bf16", False), ("fp32", True), ("fp16", True)):
        ptrs = {"a_ptr": _PTR[dt], "x_ptr": _PTR[dt] if not upcast or dt == "fp32" else "*fp32",
                "c_ptr": "*fp32", "sq_ptr": "*fp32"}
        for store, sq in ((True, False), (False, True)):
            out.append((f"tn[{dt},upcast={upcast},store={store},sq={sq}]", tn._tn_kernel, ptrs,
                        dict(BP=64, BQ=64, BL=32, UPCAST=upcast, STORE=store, SQ=sq)))
    for dt in ("fp16", "bf16", "fp32"):
        out.append((f"gram[{dt}]", tn._gram_kernel, {"a_ptr": _PTR[dt], "c_ptr": "*fp32"},
                    dict(BT=64, BL=32, UPCAST=dt == "fp32")))
    for dt in ("fp16", "fp32"):
        ptrs = {"u1": _PTR[dt], "u2": _PTR[dt], "x": _PTR[dt], "c1": "*fp32", "c2": "*fp32", "c3": "*fp32",
                "oa": "*fp32", "ob": "*fp32"}
        for flags in (dict(HAS_U2=True, HAS_X=True, WRITE_A=True, WRITE_B=True, SUM=False),
                      dict(HAS_U2=True, HAS_X=True, WRITE_A=True, WRITE_B=True, SUM=True),
                      dict(HAS_U2=False, HAS_X=False, WRITE_A=True, WRITE_B=False, SUM=False)):
            label = ",".join(k for k, v in flags.items() if v)
            out.append((f"expand[{dt},{label}]", lowrank._expand_kernel, ptrs, dict(BM=64, BK=32, RP=16, **flags)))
    return out


def _jit(kernel):
    return getattr(kernel, "fn", kernel)  # an Autotuner wraps the JITFunction


def compile_all(arch: int = 90, only: set[str] | None = None) -> list[tuple[str, int]]:
    """Compiles every variant (or those labelled in `only`) for sm_<arch>; returns (label,
    cubin bytes). Raises on the first failure, naming the variant."""
    if interpreting():
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset (the interpreter compiles nothing)")
    done = []
    for label, kernel, ptrs, const in variants():
        if only is not None and label not in only:
            continue
        try:
            done.append((label, _compile(_jit(kernel), arch, ptrs, const)))
        except Exception as exc:
            raise RuntimeError(f"{label} failed to compile for sm_{arch}: {type(exc).__name__}: {exc}") from exc
    return done


if __name__ == "__main__":
    for a in [int(x) for x in sys.argv[1:]] or [90]:
        for label, size in compile_all(a):
            print(f"sm_{a} {label}: {size} bytes of cubin")
