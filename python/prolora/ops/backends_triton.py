"""Triton backends (kernels in the subpackage prolora.kernels) of project_lora,
truncated_svd and subspace_phi.

They run on CUDA devices; without one `available` says so and they cannot be chosen (the tests
run the same functions on CPU tensors under TRITON_INTERPRET=1). On a GPU they are the default
only where the measured-winners table (ops.measured) says they beat torch; without a table torch
stays the default, and --backend forces them wherever they can run the problem. Triton itself is
imported only when a kernel runs.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .. import _native
from . import measured
from .svd import as_batch
from .gram_basis import bases_from_eigh, gram_operand
from .projection import project_lora
from .registry import Problem
from .subspace_phi import check_pair, finish, subspace_phi
from .svd import Basis, KSpec, truncated_svd

try:
    from ..kernels import _config as _kconfig
except ImportError as exc:  # a broken install missing the prolora.kernels subpackage
    _kconfig = None
    _KERNELS_WHY = f"prolora.kernels is not installed ({exc})"
else:
    _KERNELS_WHY = None

_DTYPES = ("float16", "bfloat16", "float32")


def triton_missing() -> str | None:
    """None when the Triton kernels can run on a GPU here, else why not."""
    return _KERNELS_WHY or _kconfig.gpu_missing()


def _jacobi_missing() -> str | None:
    return triton_missing() or _native.why_unavailable()


def _check(op: str, backend: str):
    def check(p: Problem) -> str | None:
        if not p.device.startswith("cuda"):
            return f"Triton kernels run on CUDA devices, not {p.device}"
        if p.dtype not in _DTYPES:
            return f"dtype {p.dtype} not supported (float16, bfloat16 or float32)"
        if backend.endswith("jacobi"):
            return _native.cuda_unavailable_reason()
        return None
    return check


def _measured(op: str, backend: str):
    """The default only where the measured-winners table says it beats torch on this GPU."""
    return lambda p: measured.verdict(op, backend, p)


def _on(t: torch.Tensor):
    """Launch on t's device (Triton launches on the current one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _float32_only(dtype: torch.dtype | None, what: str) -> None:
    if dtype not in (None, torch.float32):
        raise ValueError(f"{what} computes in float32 (from float16/bfloat16/float32 inputs), not {dtype}")


# ---- project_lora ----------------------------------------------------------------------------


@project_lora.register("triton", priority=20, check=_check("project_lora", "triton"),
                       measured=_measured("project_lora", "triton"), available=triton_missing)
def _project_triton(B, A, Us, Vs, Ut, Vt, method: str, dtype: torch.dtype | None = None, cross=None):
    """Fused low-rank projection: [P_Ut P_Us B | Q_Ut Q_Us B] and the A side in O((m+n) k r),
    float32 accumulation and outputs from float16/bfloat16/float32 inputs. `cross` is not used:
    the kernel fuses the thin products instead."""
    _float32_only(dtype, "project_lora/triton")
    from ..kernels.projection import project

    with _on(B):
        return project(B, A, Us, Vs, Ut, Vt, method)


def project_batched(B, A, Us, Vs, Ut, Vt, method: str):
    """Many same-shape layers in one set of launches: B (b, m, r), A (b, r, n), bases (b, m, k),
    (b, n, k) -> (up, down) float32, as project_lora for each layer."""
    from ..kernels.projection import project_batched as run

    with _on(B):
        return run(B, A, Us, Vs, Ut, Vt, method)


# ---- truncated_svd ---------------------------------------------------------------------------


def _gram_bases(W, k, dtype, eigh) -> Basis | list[Basis]:
    """Triton Gram matrices (one launch for the batch, lower-triangle tiles), `eigh` -> (evals,
    evecs) in descending order, the other side recovered with the Triton product, per matrix."""
    _float32_only(dtype, "truncated_svd/gram-triton")
    from ..kernels.tn import gram, tn

    Wb, ks, batched = as_batch(W, k)
    A, wide = gram_operand(Wb)
    with _on(Wb):
        G = gram(A)
        energies = G.diagonal(dim1=-2, dim2=-1).double().sum(-1).tolist()
        evals, evecs = eigh(G)
        del G

        def recover(i: int, Q: torch.Tensor) -> torch.Tensor:
            return tn(Wb[i] if wide else Wb[i].mT, Q)[0]

        out = bases_from_eigh(evals, evecs, energies, ks, recover, wide)
    return out if batched else out[0]


def _eigh_torch(G: torch.Tensor):
    """torch.linalg.eigh one matrix at a time (batch-independent; cuSOLVER loops above 32
    anyway), reordered to descending."""
    pairs = [torch.linalg.eigh(g) for g in G]
    if not pairs:
        return G.new_empty(0, G.shape[1]), G.new_empty(G.shape)
    return torch.stack([w.flip(-1) for w, _ in pairs]), torch.stack([v.flip(-1) for _, v in pairs])


def _eigh_jacobi(G: torch.Tensor):
    return _native.batched_eigh(G, threads=torch.get_num_threads())


@truncated_svd.register("gram-triton", priority=20, check=_check("truncated_svd", "gram-triton"),
                        measured=_measured("truncated_svd", "gram-triton"), available=triton_missing)
def _svd_gram_triton(W: torch.Tensor, k: KSpec | Sequence[KSpec] = None, dtype: torch.dtype | None = None):
    """Triton Gram (fp32 accumulation straight from fp16/bf16 weights, no fp32 copy of W) +
    torch.linalg.eigh."""
    return _gram_bases(W, k, dtype, _eigh_torch)


@truncated_svd.register("gram-triton-jacobi", priority=20, available=_jacobi_missing,
                        check=_check("truncated_svd", "gram-triton-jacobi"),
                        measured=_measured("truncated_svd", "gram-triton-jacobi"))
def _svd_gram_triton_jacobi(W: torch.Tensor, k: KSpec | Sequence[KSpec] = None,
                            dtype: torch.dtype | None = None):
    """Triton Gram + the native batched Jacobi eigensolver (one CUDA block per matrix, all in
    one launch instead of cuSOLVER's host loop)."""
    return _gram_bases(W, k, dtype, _eigh_jacobi)


# ---- similarity ------------------------------------------------------------------------------


@subspace_phi.register("triton", priority=20, check=_check("subspace_phi", "triton"),
                       measured=_measured("subspace_phi", "triton"), available=triton_missing)
def _phi_triton(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """U_s^T U_t for every pair of the batch in one launch, squared Frobenius norms summed from
    per-tile partials in the same launch (the k x k products are never written)."""
    _float32_only(dtype, "subspace_phi/triton")
    check_pair(A, B)
    from ..kernels.tn import tn

    with _on(A):
        _, sq = tn(A, B, store=False, squares=True)
    return finish(sq, A.shape[-1])
