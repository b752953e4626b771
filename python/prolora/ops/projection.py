"""project_lora: the exact low-rank ProLoRA projection of a LoRA (METHOD.md), never forming m x n."""
from __future__ import annotations

import torch

from .registry import Op

METHODS = ("prolora", "prolora-full", "subspace", "copy")

project_lora = Op("project_lora", "project a LoRA (B, A) from source to target singular subspaces")


def _rows(X, Us, Ut, M=None, summed: bool = False):
    """One side of the projection with the factor as rows, X = B^T (r x m) or A (r x n):
    (X_par, X_perp) = (X P_Us P_Ut, X Q_Us Q_Ut), or their sum when `summed`, as thin products
    only: O(m k r). Rows, not columns: r x m @ m x k is the layout CPU BLAS runs fastest for these
    thin shapes, and addmm accumulates in place. M = Ut^T Us (k x k) is O(m k^2) to form, so it is
    used only when given: the similarity gate has formed it already, once per module for every
    LoRA, and with it four thin products do instead of six (X P_Us Ut = a M^T, X Q_Us Ut = c - a M^T)."""
    a = X @ Us
    if M is None:
        PX = a @ Us.T
        X_par = (PX @ Ut) @ Ut.T
        QX = X - PX
        X_perp = QX - (QX @ Ut) @ Ut.T
        return X_par + X_perp if summed else (X_par, X_perp)
    c = X @ Ut
    aM = a @ M.to(a.dtype).T
    if summed:  # X_par + X_perp = X - a Us^T + (2 a M^T - c) Ut^T
        return torch.addmm(X, a, Us.T, alpha=-1).addmm_(aM.mul_(2).sub_(c), Ut.T)
    X_perp = torch.addmm(X, a, Us.T, alpha=-1).addmm_(c - aM, Ut.T, alpha=-1)
    return aM @ Ut.T, X_perp


@project_lora.register("reference", reference=True)
def _project_reference(B: torch.Tensor, A: torch.Tensor, Us: torch.Tensor, Vs: torch.Tensor,
                       Ut: torch.Tensor, Vt: torch.Tensor, method: str,
                       dtype: torch.dtype | None = None,
                       cross: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B (m x r, scale already folded in), A (r x n) -> (up, down) with dW_t = up @ down.
    `cross` = (Ut^T Us, Vt^T Vs) when the caller has them (fewer products, same result).

    prolora:      up = [B_par | B_perp], down = [A_par ; A_perp]    (rank <= 2r)
    prolora-full: up = B_par + B_perp,   down = A_par + A_perp      (rank <= r)
    subspace:     up = B_par,            down = A_par
    copy:         up = B,                down = A
    """
    if method == "copy":
        return B, A
    dtype = dtype or torch.float64
    B, A, Us, Vs, Ut, Vt = (x.to(dtype) for x in (B, A, Us, Vs, Ut, Vt))
    Ml, Mr = cross if cross is not None else (None, None)
    if method == "prolora-full":
        return _rows(B.T, Us, Ut, Ml, summed=True).T, _rows(A, Vs, Vt, Mr, summed=True)
    Bt_par, Bt_perp = _rows(B.T, Us, Ut, Ml)
    B_par, B_perp = Bt_par.T, Bt_perp.T
    A_par, A_perp = _rows(A, Vs, Vt, Mr)
    if method == "prolora":
        return torch.cat([B_par, B_perp], dim=1), torch.cat([A_par, A_perp], dim=0)
    if method == "subspace":
        return B_par, A_par
    raise ValueError(f"unknown method {method!r}")


@project_lora.register("torch", priority=10)
def _project_torch(B, A, Us, Vs, Ut, Vt, method: str, dtype: torch.dtype | None = None, cross=None):
    """The same thin-GEMM chain in float32 (or `dtype`): what every device runs fast."""
    return _project_reference(B, A, Us, Vs, Ut, Vt, method, dtype=dtype or torch.float32, cross=cross)
