"""Whether Triton can run here, and the launch configurations the kernels use: several to
autotune over on a GPU, one small fixed one under the interpreter (TRITON_INTERPRET=1), where
autotuning would only multiply the (slow, numpy-emulated) runs."""
from __future__ import annotations

import functools
import os

import torch

NO_GPU = "no CUDA device; Triton kernels are interpreter-tested only"
# Tile sizes under the interpreter: tl.dot needs every dimension >= 16.
INTERP_TILE = 16


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels run on CPU tensors, emulated with numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_missing() -> str | None:
    """None when `import triton` works, else why not, in one line."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return f"triton is not importable: {type(exc).__name__}: {exc}"
    return None


def gpu_missing() -> str | None:
    """None when Triton kernels can run on a CUDA device here, else why not (for `available`).
    The device comes first: without one, Triton is not even imported (dispatch asks this on
    every run, and importing Triton takes seconds)."""
    if not torch.cuda.is_available():
        return NO_GPU
    return triton_missing()


def autotune(configs: list[dict], key: list[str], reset_to_zero: list[str] | None = None):
    """triton.autotune over `configs` (dicts of meta-parameters plus num_warps/num_stages) on a
    GPU; under the interpreter the kernel is returned as is and callers pass interp_meta()."""
    import triton

    if interpreting():
        return lambda fn: fn
    out = []
    for c in configs:
        meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
        out.append(triton.Config(meta, num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 2)))
    return triton.autotune(configs=out, key=key, reset_to_zero=reset_to_zero)


def interp_meta(**meta: int) -> dict[str, int]:
    """The fixed meta-parameters to pass at launch under the interpreter ({} on a GPU, where
    the autotuner supplies them)."""
    return dict(meta) if interpreting() else {}


def next_pow2(x: int, least: int = INTERP_TILE) -> int:
    """Smallest power of two >= max(x, least): a block size covering x."""
    n = least
    while n < x:
        n *= 2
    return n


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter only."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise ValueError(f"Triton kernels need CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), "
                         f"got a tensor on {t.device}")
