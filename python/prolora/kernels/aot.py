"""Ahead-of-time compile of every kernel configuration for a CUDA target, without a GPU.

The interpreter checks the kernels' math, not that they lower through Triton's real pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas) nor what they cost a GPU. This compiles every
autotune configuration of every kernel, for every operand dtype and flag combination the
launchers use, for sm_80 (A100) and sm_90 (H100/H200), and checks each cubin against the
architecture's per-block limits: shared memory (`metadata.shared`), registers per thread and per
block (from the cubin's resource usage, read with Triton's bundled cuobjdump), and that the
shared-memory estimate used to prune configurations at launch (`*_shared`) is an upper bound.

Launches are specialized as Triton's JIT specializes a contiguous, 16-byte aligned launch:
unit strides become the constant 1, other integers and pointers carry divisibility 16. That is
the case with the most vectorized (cp.async) loads, hence the most pipelined shared memory.
Must run without TRITON_INTERPRET.

    python -m prolora.kernels.aot [--ci] [ARCH ...]      # default: 80 90, the full matrix
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from ._config import ARCH_LIMITS, interpreting, meta_of

_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_DTYPES = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Variant:
    """One compile: a kernel ("tn", "gram", "expand"), its pointer types, its constexpr flags,
    the strides that are 1 in the launch, and one autotune configuration."""
    kernel: str
    ptrs: tuple[tuple[str, str], ...]
    flags: tuple[tuple[str, bool], ...]
    unit: tuple[str, ...]
    config: tuple[tuple[str, int], ...]

    @property
    def label(self) -> str:
        types = ",".join(f"{n}={t[1:]}" for n, t in self.ptrs)
        on = ",".join(k for k, v in self.flags if v)
        cfg = " ".join(f"{k}={v}" for k, v in self.config)
        return f"{self.kernel}[{types}|{on}] {cfg}"


@dataclass
class Result:
    """What the compiler made of one variant for one architecture; `problems` is empty when it
    is within the limits."""
    label: str
    arch: int
    shared: int = 0
    estimate: int = 0
    regs: int = 0
    spill: int = 0           # bytes of register spill stores per thread
    threads: int = 0
    problems: list[str] = field(default_factory=list)


def _kernels():
    from . import lowrank, tn

    return {"tn": (tn._tn_kernel, tn._TN_CONFIGS, tn.tn_shared, tn.tn_keeps),
            "gram": (tn._gram_kernel, tn._GRAM_CONFIGS, tn.gram_shared, tn.gram_keeps),
            "expand": (lowrank._expand_kernel, lowrank._CONFIGS, lowrank.expand_shared, None)}


def _tn_variants(configs, keeps=None) -> list[Variant]:
    """Every (A, X) dtype pair (bases, LoRA factors and float32 intermediates mix freely), with
    the three output modes: C only, C and the squared norms, the norms only; each with the
    configurations a launch of that pair autotunes over (`keeps`)."""
    out = []
    for da in _DTYPES:
        for dx in _DTYPES:
            upcast = not (da == dx and da in ("fp16", "bf16"))
            ptrs = (("a_ptr", _PTR[da]), ("x_ptr", _PTR[dx]), ("c_ptr", "*fp32"), ("sq_ptr", "*fp32"))
            for store, sq in ((True, False), (True, True), (False, True)):
                flags = (("UPCAST", upcast), ("STORE", store), ("SQ", sq))
                out += [Variant("tn", ptrs, flags, ("sap", "sxq", "scq"), tuple(c.items())) for c in configs
                        if keeps is None or keeps(c, {**dict(flags), **dict(ptrs)})]
    return out


def _gram_variants(configs, keeps=None) -> list[Variant]:
    out = []
    for d in _DTYPES:
        ptrs = (("a_ptr", _PTR[d]), ("c_ptr", "*fp32"))
        flags = (("UPCAST", d == "fp32"),)
        out += [Variant("gram", ptrs, flags, ("sad", "scc"), tuple(c.items())) for c in configs
                if keeps is None or keeps(c, dict(flags))]
    return out


# the flag sets projection._side launches: P = U C, then [par | perp] or par + perp
_EXPAND_FLAGS = (
    dict(HAS_U2=False, HAS_X=False, WRITE_A=True, WRITE_B=False, SUM=False),
    dict(HAS_U2=True, HAS_X=True, WRITE_A=True, WRITE_B=True, SUM=False),
    dict(HAS_U2=True, HAS_X=True, WRITE_A=True, WRITE_B=True, SUM=True),
)


def _expand_variants(configs) -> list[Variant]:
    """Every basis dtype, with X (a LoRA factor) in the bases' dtype or float32 where X is read."""
    out = []
    for du in _DTYPES:
        for flags in _EXPAND_FLAGS:
            for dx in ((du, "fp32") if flags["HAS_X"] and du != "fp32" else (du,)):
                ptrs = (("u1", _PTR[du]), ("u2", _PTR[du]), ("x", _PTR[dx]), ("c1", "*fp32"), ("c2", "*fp32"),
                        ("c3", "*fp32"), ("oa", "*fp32"), ("ob", "*fp32"))
                unit = ("su1k", "su2k", "sxr", "scr", "soar", "sobr")
                out += [Variant("expand", ptrs, tuple(flags.items()), unit, tuple(c.items())) for c in configs]
    return out


def variants(full: bool = True) -> list[Variant]:
    """Every (kernel, dtypes, flags, autotune configuration) the launchers can run (370
    compiles for sm_80 + sm_90, ~3.5 CPU-minutes cold); full=False: the CI subset (`in_ci`),
    still every autotune configuration of every kernel with every operand dtype pair it is
    launched with (154 compiles, ~1 CPU-minute cold). Triton's cache makes reruns seconds."""
    k = _kernels()
    out = _tn_variants(k["tn"][1], k["tn"][3]) + _gram_variants(k["gram"][1], k["gram"][3]) \
        + _expand_variants(k["expand"][1])
    return out if full else [v for v in out if in_ci(v)]


def in_ci(v: Variant) -> bool:
    """The CI subset of `variants()`: what changes the compiled dot and its pipeline (the tile
    configuration, the operand dtypes) in full; the epilogue flags in their heaviest set. tn:
    every dtype pair with C and the norms both written. gram: all. expand: every basis dtype
    for the U C launch and the two-output launch (three dots, two accumulators) with X in
    float32. The slow full matrix adds tn's other output modes, expand's summed output and X in
    the bases' dtype."""
    ptrs, flags = dict(v.ptrs), dict(v.flags)
    if v.kernel == "tn":
        return flags["STORE"] and flags["SQ"]
    if v.kernel == "expand":
        return (not flags["SUM"] and ptrs["x"] == "*fp32") or not flags["HAS_X"]
    return True


def _cubin_resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack frame bytes per thread) of the cubin's one kernel, from
    `cuobjdump -res-usage` (Triton's bundled copy)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) .*?LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text[-500:]}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def _spill_stores(ptx: str, arch: int) -> tuple[int, int]:
    """(bytes of register spill stores per thread, registers) from `ptxas -v` (the ptxas Triton
    uses for this arch) on the kernel's PTX: a stack frame alone may be scratch, not spills."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # the options Triton 3.9's make_cubin passes (floating-point fusion on), so that the
        # report describes the cubin Triton made: its register count must agree
        proc = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                               src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    m, r = re.search(r"(\d+) bytes spill stores", log), re.search(r"Used (\d+) registers", log)
    if m is None or r is None:
        raise RuntimeError(f"no spill report in ptxas -v: {log[-500:]}")
    return int(m.group(1)), int(r.group(1))


def compile_one(v: Variant, arch: int) -> Result:
    """Compiles `v` for sm_<arch> and checks it against the architecture's limits."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel, _, shared_fn, _ = _kernels()[v.kernel]
    jit = getattr(kernel, "fn", kernel)  # an Autotuner wraps the JITFunction
    config = dict(v.config)
    names = jit.arg_names
    consts = {**dict(v.flags), **meta_of(config), **{n: 1 for n in v.unit}}
    ptrs = dict(v.ptrs)
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n] != "constexpr"}
    src = ASTSource(fn=jit, signature=sig, constexprs={(names.index(k),): c for k, c in consts.items()},
                    attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    options = make_backend(target).parse_options({"num_warps": config["num_warps"],
                                                  "num_stages": config["num_stages"]})
    res = Result(v.label, arch)
    try:
        compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:
        res.problems.append(f"does not compile: {type(exc).__name__}: {str(exc)[:300]}")
        return res
    lim = ARCH_LIMITS[arch]
    res.shared = int(compiled.metadata.shared)
    res.threads = 32 * int(compiled.metadata.num_warps)
    res.regs, stack = _cubin_resources(compiled.asm["cubin"])
    if stack:
        res.spill, regs = _spill_stores(compiled.asm["ptx"], arch)
        if regs != res.regs:
            res.problems.append(f"ptxas -v reports {regs} registers, the cubin {res.regs}: not the same build")
    res.estimate = shared_fn(config, {**ptrs, **dict(v.flags), "R": 1})
    if res.shared > lim.max_shared:
        res.problems.append(f"shared memory {res.shared} B > {lim.max_shared} B")
    if res.regs > lim.max_regs_thread:
        res.problems.append(f"{res.regs} registers per thread > {lim.max_regs_thread}")
    if res.regs * res.threads > lim.max_regs_block:
        res.problems.append(f"{res.regs} registers x {res.threads} threads > {lim.max_regs_block} per block")
    if res.spill:
        res.problems.append(f"spills registers ({res.spill} B of spill stores per thread)")
    if res.estimate < res.shared:
        res.problems.append(f"shared-memory estimate {res.estimate} B < the compiler's {res.shared} B "
                            f"(launch-time pruning would keep a config that does not fit)")
    return res


def _compile_star(job: tuple[Variant, int]) -> Result:
    return compile_one(*job)


def compile_all(archs=(80, 90), full: bool = True, workers: int | None = None) -> list[Result]:
    """Compiles every variant (or the CI subset, full=False) for each sm_<arch>, in a process
    pool of `workers` (default: the CPU count); returns one Result per compile."""
    if interpreting():
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset (the interpreter compiles nothing)")
    jobs = [(v, a) for a in archs for v in variants(full)]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_compile_star(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_star, jobs, chunksize=4))


def summary(results: list[Result]) -> str:
    """Per architecture and kernel: compiles, the largest shared memory and registers seen, and
    every variant over a limit."""
    lines = []
    for arch in sorted({r.arch for r in results}):
        for kernel in ("tn", "gram", "expand"):
            rs = [r for r in results if r.arch == arch and r.label.startswith(kernel + "[")]
            if not rs:
                continue
            bad = sum(1 for r in rs if r.problems)
            lines.append(f"sm_{arch} {kernel}: {len(rs)} configurations, max shared {max(r.shared for r in rs)} B "
                         f"(limit {ARCH_LIMITS[arch].max_shared}), max registers {max(r.regs for r in rs)}/thread, "
                         f"max spill {max(r.spill for r in rs)} B, {bad} over a limit")
    lines += [f"  sm_{r.arch} {r.label}: {'; '.join(r.problems)}" for r in results if r.problems]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    argv = sys.argv[1:]
    results = compile_all(tuple(int(x) for x in argv if x != "--ci") or (80, 90), full="--ci" not in argv)
    print(summary(results))
    sys.exit(1 if any(r.problems for r in results) else 0)
