"""The native module prolora._C seen from torch: batched Jacobi SVD and symmetric eigensolver for
many small matrices, on CPU (std::thread workers) and, when the module was built with CUDA, on
the GPU (one thread block per matrix, on torch's current stream).

The module is optional. `available()` says whether it loaded and `why_unavailable()` why not;
the functions raise NativeUnavailableError with that reason rather than an ImportError.
The module works on raw addresses and strides, so it is independent of the torch version.
"""
from __future__ import annotations

import torch

from .errors import NativeUnavailableError

try:
    from . import _C
except ImportError as exc:  # not built, or built for another Python
    _C = None
    _WHY = f"native module not built: {exc}"
else:
    _WHY = None

DEFAULT_MAX_SWEEPS = 30
_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def available() -> bool:
    """Whether prolora._C is importable."""
    return _C is not None


def why_unavailable() -> str | None:
    """One line saying why prolora._C is unavailable, or None when it is available."""
    return _WHY


def has_cuda() -> bool:
    """Whether prolora._C was built with its CUDA launchers (says nothing about a GPU)."""
    return _C is not None and bool(_C.has_cuda())


def cuda_unavailable_reason() -> str | None:
    """None when the module can work on CUDA tensors, else why not, in one line. The module links
    its own CUDA runtime, which needs a driver at least as new as the toolkit it was built with."""
    if _C is None:
        return _WHY
    if not _C.has_cuda():
        return "prolora._C was built without CUDA (no working nvcc at build time)"
    status = _C.cuda_status()
    return f"prolora._C cannot use CUDA: {status}" if status else None


def _as_batch(a: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
    """(batch, m, n) view of a 2-D or 3-D float32/float64 tensor on a device the module serves,
    and whether a batch dimension was added."""
    if _C is None:
        raise NativeUnavailableError(_WHY)
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(a).__name__}")
    if a.dim() not in (2, 3):
        raise ValueError(f"{what}: expected a (batch, m, n) or (m, n) tensor, got shape {tuple(a.shape)}")
    if a.dtype not in _DTYPES:
        raise TypeError(f"{what}: expected float32 or float64, got {a.dtype}")
    if a.device.type == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            raise NativeUnavailableError(f"{what}: {reason}")
    elif a.device.type != "cpu":
        raise ValueError(f"{what}: tensors on {a.device.type} are not supported (cpu or cuda)")
    a = a.detach()
    return (a.unsqueeze(0), True) if a.dim() == 2 else (a, False)


def _options(max_sweeps: int, tol: float | None, threads: int | None) -> tuple[int, float, int]:
    if max_sweeps < 1:
        raise ValueError(f"max_sweeps must be >= 1, got {max_sweeps}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0 (or None for the default), got {tol}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for all cores), got {threads}")
    return int(max_sweeps), float(tol or 0.0), int(threads or 0)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _run(cpu_fn, cuda_fn, workspace_elems, x: torch.Tensor, args: tuple, batch: int,
         threads: int, max_sweeps: int, tol: float, info: torch.Tensor | None) -> None:
    """Calls the CPU or CUDA launcher; every tensor stays referenced until the call returns (on
    CUDA, torch's stream-ordered allocator keeps the memory valid for the queued kernel)."""
    dtype = _DTYPES[x.dtype]
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            elems = workspace_elems(dtype)
            work = torch.empty(batch * elems, dtype=x.dtype, device=x.device) if elems else None
            stream = torch.cuda.current_stream(x.device).cuda_stream
            cuda_fn(*args, dtype, work=_ptr(work), stream=stream, max_sweeps=max_sweeps, tol=tol,
                    info=_ptr(info))
    else:
        cpu_fn(*args, dtype, threads=threads, max_sweeps=max_sweeps, tol=tol, info=_ptr(info))


def batched_svd(a: torch.Tensor, max_sweeps: int = DEFAULT_MAX_SWEEPS, tol: float | None = None,
                threads: int | None = None, return_sweeps: bool = False):
    """Thin SVD of each matrix of `a` ((batch, m, n) or (m, n), float32/float64, any strides):
    a = U diag(S) V^T with U (..., m, k), S (..., k) descending, V (..., n, k), k = min(m, n),
    computed in a's dtype. Vectors are sign-arbitrary (and, for repeated values, basis-arbitrary).

    tol: relative orthogonality threshold between working columns (None: 2 * eps).
    threads: CPU workers (None: all cores). return_sweeps: also return an int32 tensor of sweeps
    used per matrix, -1 where max_sweeps did not reach convergence.
    """
    x, squeeze = _as_batch(a, "batched_svd")
    max_sweeps, tol, threads = _options(max_sweeps, tol, threads)
    b, m, n = x.shape
    k = min(m, n)
    u = x.new_empty(b, m, k)
    s = x.new_empty(b, k)
    v = x.new_empty(b, n, k)
    info = torch.empty(b, dtype=torch.int32, device=x.device) if return_sweeps else None
    args = (x.data_ptr(), x.stride(), u.data_ptr(), u.stride(), s.data_ptr(), s.stride(),
            v.data_ptr(), v.stride(), b, m, n)
    _run(_C.svd_jacobi_cpu, getattr(_C, "svd_jacobi_cuda", None),
         lambda dt: _C.svd_cuda_workspace_elems(m, n, dt), x, args, b, threads, max_sweeps, tol, info)
    out = (u[0], s[0], v[0]) if squeeze else (u, s, v)
    return (*out, info[0] if squeeze else info) if return_sweeps else out


def batched_eigh(a: torch.Tensor, max_sweeps: int = DEFAULT_MAX_SWEEPS, tol: float | None = None,
                 threads: int | None = None, return_sweeps: bool = False):
    """Eigendecomposition of each symmetric matrix of `a` ((batch, n, n) or (n, n), float32/float64,
    any strides; only the lower triangle is read): a = V diag(w) V^T with w (..., n) in descending
    order and V (..., n, n) orthonormal. Returns (w, V) (plus sweeps, as for batched_svd).

    tol: relative threshold |a_pq| / sqrt(|a_pp a_qq|) (None: 2 * eps).
    """
    x, squeeze = _as_batch(a, "batched_eigh")
    max_sweeps, tol, threads = _options(max_sweeps, tol, threads)
    b, n, n2 = x.shape
    if n != n2:
        raise ValueError(f"batched_eigh: expected square matrices, got {n} x {n2}")
    w = x.new_empty(b, n)
    v = x.new_empty(b, n, n)
    info = torch.empty(b, dtype=torch.int32, device=x.device) if return_sweeps else None
    args = (x.data_ptr(), x.stride(), w.data_ptr(), w.stride(), v.data_ptr(), v.stride(), b, n)
    _run(_C.eigh_jacobi_cpu, getattr(_C, "eigh_jacobi_cuda", None),
         lambda dt: _C.eigh_cuda_workspace_elems(n, dt), x, args, b, threads, max_sweeps, tol, info)
    out = (w[0], v[0]) if squeeze else (w, v)
    return (*out, info[0] if squeeze else info) if return_sweeps else out
