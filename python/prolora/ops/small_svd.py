"""small_svd: thin SVDs of many small dense matrices at once, e.g. the 2r x 2r cores of
method.compress for every layer of a chunk, or k x k similarity products.

Backends take X (b, m, n) or (m, n) and return (U, S, Vh) as torch.linalg.svd(full_matrices=False)
does: U (..., m, q), S (..., q) descending, Vh (..., q, n), q = min(m, n). Vectors are
sign-arbitrary; compare factorizations by reconstruction and subspaces by principal angles.
"""
from __future__ import annotations

import torch

from .registry import Op

small_svd = Op("small_svd", "thin SVD of a batch of small dense matrices (compress cores, k x k products)")

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(X: torch.Tensor, dtype: torch.dtype | None, default: torch.dtype | None = None) -> torch.dtype:
    """`dtype` if given, else `default`, else X's dtype with half precision raised to float32."""
    if dtype is not None:
        return dtype
    if default is not None:
        return default
    return torch.float32 if X.dtype in _HALF else X.dtype


@small_svd.register("reference", reference=True)
def _small_svd_reference(X: torch.Tensor, dtype: torch.dtype | None = None):
    """torch.linalg.svd in float64 (unless told)."""
    return torch.linalg.svd(X.to(compute_dtype(X, dtype, torch.float64)), full_matrices=False)


@small_svd.register("torch", priority=10)
def _small_svd_torch(X: torch.Tensor, dtype: torch.dtype | None = None):
    """torch.linalg.svd in X's precision (LAPACK gesdd on CPU, cuSOLVER on CUDA)."""
    return torch.linalg.svd(X.to(compute_dtype(X, dtype)), full_matrices=False)
