"""Whether Triton can run here, and the launch configurations the kernels use.

On a GPU every kernel autotunes over its list of configurations, first pruned to those whose
shared memory fits the device (`fitting`, from `shared_bytes` estimates that the AOT check in
aot.py proves to be upper bounds of what the compiler allocates). Under the interpreter
(TRITON_INTERPRET=1) autotuning would only multiply the slow numpy-emulated runs, so one fixed
small tile is used, or, in tests, any configuration's tile sizes (`interp_config`): the
interpreter then runs the same tile shapes, masks and rank tiles a GPU would.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

NO_GPU = "no CUDA device; Triton kernels are interpreter-tested only"
# Tile sizes under the interpreter: tl.dot needs every dimension >= 16.
INTERP_TILE = 16
# Grid axis 0 holds up to 2**31 - 1 programs (axes 1 and 2 only 65,535): every kernel folds its
# batch into axis 0.
MAX_PROGRAMS = 2**31 - 1
_LAUNCH_KEYS = ("num_warps", "num_stages")


@dataclass(frozen=True)
class ArchLimits:
    """Per-block resource limits of a CUDA architecture (CUDA programming guide, table of
    technical specifications per compute capability)."""
    arch: int
    max_shared: int          # dynamic shared memory per block, opt-in maximum, bytes
    max_regs_thread: int = 255
    max_regs_block: int = 65536


ARCH_LIMITS = {80: ArchLimits(80, 166912), 90: ArchLimits(90, 232448)}


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


# ---- shared memory: estimates and the device's limit ----------------------------------------


SharedFn = Callable[[dict, dict], int]
"""shared_bytes(meta, args) of a kernel: meta holds a configuration's tile sizes and
num_stages, args the launch's named arguments (tensors and constexpr flags)."""


_POINTER_BYTES = {"*fp16": 2, "*bf16": 2, "*fp32": 4}


def elem_bytes(v) -> int:
    """Bytes per element of a launch argument: a tensor, a torch dtype, or an AOT pointer type
    such as "*fp16"."""
    if isinstance(v, torch.Tensor):
        return v.element_size()
    if isinstance(v, torch.dtype):
        return v.itemsize
    return _POINTER_BYTES[v]


def meta_of(config: dict) -> dict:
    """A configuration's meta-parameters without num_warps/num_stages (what a launch passes)."""
    return {k: v for k, v in config.items() if k not in _LAUNCH_KEYS}


def fitting(configs: list, shared_of: Callable[[object], int], limit: int) -> list:
    """The configurations whose shared memory `shared_of(config)` is at most `limit` bytes, in
    their order. Pure: the same on a CPU given any limit, which is how it is tested."""
    return [c for c in configs if shared_of(c) <= limit]


@functools.lru_cache(maxsize=None)
def device_max_shared(index: int) -> int:
    """The opt-in maximum of dynamic shared memory per block of CUDA device `index` (bytes): the
    limit Triton's launcher checks a compiled kernel against."""
    import triton

    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def _device_index(named_args: dict) -> int:
    for v in named_args.values():
        if isinstance(v, torch.Tensor) and v.is_cuda:
            return v.device.index if v.device.index is not None else torch.cuda.current_device()
    return torch.cuda.current_device()


def config_pruner(name: str, shared: SharedFn, keep: Callable[[dict, dict], bool] | None = None,
                  limit_of: Callable[[dict], int] | None = None):
    """early_config_prune for triton.autotune: drops configurations that `keep` rejects for this
    launch (e.g. rank tiles wider than the rank; all are kept if it rejects every one) and those
    over the shared memory `limit_of(named_args)` (default: the launch device's); raises, naming
    the kernel, when none is left."""
    limit_of = limit_of or (lambda named_args: device_max_shared(_device_index(named_args)))

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        limit = limit_of(named_args)
        dicts = [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]
        kept = [i for i, d in enumerate(dicts) if keep is None or keep(d, args)] or list(range(len(dicts)))
        fit = fitting(kept, lambda i: shared(dicts[i], args), limit)
        out = [configs[i] for i in fit]
        if not out:
            need = min(shared(dicts[i], args) for i in kept)
            raise RuntimeError(f"{name}: no configuration fits this device's {limit} bytes of shared "
                               f"memory per block (the smallest needs {need})")
        return out
    return prune


# ---- autotune keys: shape classes, not sizes ----------------------------------------------------


# A key per size would autotune once per distinct problem: the per-layer k of a transfer alone
# takes 138 values on SDXL's 1280-wide layers and 228 on Flux's, at about a second of tuning each.
# Keys hold each dimension's class instead (up to 64, 256, 1024, more): a full SDXL transfer
# forced onto the Triton projection meets 12 keys, for any k (tests/ops/test_kernels_keys.py).
CLASS_BOUNDS = (64, 256, 1024)


def shape_class(n: int) -> int:
    """The autotune class of a dimension: 0 (<= 64), 1 (<= 256), 2 (<= 1024) or 3."""
    return sum(int(n) > b for b in CLASS_BOUNDS)


class _Keys:
    seen: set | None = None  # recording: (kernel, key values, tensor dtypes) of every launch
    launch: bool = True


@contextlib.contextmanager
def recording_keys(launch: bool = True) -> Iterator[set]:
    """Collects the autotune key of every kernel launch in the block, as Triton's autotuner forms
    it (the key arguments' values, then every tensor argument's dtype). launch=False skips the
    kernels themselves (their outputs stay uninitialized): counting the keys that full-size
    problems meet then costs no compute."""
    before = (_Keys.seen, _Keys.launch)
    _Keys.seen, _Keys.launch = set(), launch
    try:
        yield _Keys.seen
    finally:
        _Keys.seen, _Keys.launch = before


def launch(kernel, grid, name: str, key: tuple[str, ...], *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), with its autotune key (the `key` arguments, passed by
    keyword) recorded under recording_keys()."""
    if _Keys.seen is not None:
        dtypes = tuple(str(v.dtype) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
        _Keys.seen.add((name, tuple(kwargs[k] for k in key), dtypes))
        if not _Keys.launch:
            return
    kernel[grid](*args, **kwargs)


def autotune(configs: list[dict], key: list[str], *, name: str, shared: SharedFn,
             keep: Callable[[dict, dict], bool] | None = None,
             reset_to_zero: list[str] | None = None):
    """triton.autotune over `configs` (dicts of meta-parameters plus num_warps/num_stages) on a
    GPU, pruned per launch by `keep` and the device's shared memory; under the interpreter the
    kernel is returned as is and callers pass interp_meta()."""
    import triton

    if interpreting():
        return lambda fn: fn
    out = [triton.Config(meta_of(c), num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 2))
           for c in configs]
    return triton.autotune(configs=out, key=key, reset_to_zero=reset_to_zero,
                           prune_configs_by={"early_config_prune": config_pruner(name, shared, keep)})


# ---- the interpreter's tile sizes -----------------------------------------------------------


_FORCED: dict[str, dict] = {}


@contextlib.contextmanager
def interp_config(kernel: str, config: dict) -> Iterator[None]:
    """Under the interpreter, launches of `kernel` ("tn", "gram", "expand") inside the block
    use `config`'s tile sizes instead of INTERP_TILE (tests run every GPU configuration's tile
    shapes this way). num_warps/num_stages are ignored: the interpreter has neither."""
    if not interpreting():
        raise RuntimeError("interp_config works under TRITON_INTERPRET=1 only (on a GPU the autotuner "
                           "chooses the configuration)")
    before = _FORCED.get(kernel)
    _FORCED[kernel] = meta_of(config)
    try:
        yield
    finally:
        if before is None:
            _FORCED.pop(kernel, None)
        else:
            _FORCED[kernel] = before


def interp_meta(kernel: str, **default: int) -> dict[str, int]:
    """The meta-parameters to pass at launch under the interpreter: those forced by
    interp_config for `kernel`, else `default`; {} on a GPU, where the autotuner supplies them."""
    if not interpreting():
        return {}
    return dict(_FORCED.get(kernel, default))


def next_pow2(x: int, least: int = INTERP_TILE) -> int:
    """Smallest power of two >= max(x, least): a block size covering x."""
    n = least
    while n < x:
        n *= 2
    return n


def check_grid(programs: int, what: str) -> int:
    """`programs` (the batch folded into grid axis 0), or a ValueError past axis 0's limit."""
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{what}: {programs} programs exceed grid axis 0's limit of {MAX_PROGRAMS}; "
                         f"split the batch")
    return programs


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter only."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise ValueError(f"Triton kernels need CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), "
                         f"got a tensor on {t.device}")
