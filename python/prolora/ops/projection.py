"""project_lora: the exact low-rank ProLoRA projection of a LoRA (METHOD.md), never forming m x n."""
from __future__ import annotations

import torch

from .registry import Op

METHODS = ("prolora", "prolora-full", "subspace", "copy")

project_lora = Op("project_lora", "project a LoRA (B, A) from source to target singular subspaces")


def _left(B, Us, Ut):
    """(B_par, B_perp) = (P_Ut P_Us B, Q_Ut Q_Us B), as thin products only: O(m k r), never
    the k x k product Ut^T Us (O(m k^2), which dominates when k >> r)."""
    Bs = Us.T @ B
    PB = Us @ Bs
    B_par = Ut @ (Ut.T @ PB)
    QB = B - PB
    B_perp = QB - Ut @ (Ut.T @ QB)
    return B_par, B_perp


@project_lora.register("reference", reference=True)
def _project_reference(B: torch.Tensor, A: torch.Tensor, Us: torch.Tensor, Vs: torch.Tensor,
                       Ut: torch.Tensor, Vt: torch.Tensor, method: str,
                       dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B (m x r, scale already folded in), A (r x n) -> (up, down) with dW_t = up @ down.

    prolora:      up = [B_par | B_perp], down = [A_par ; A_perp]    (rank <= 2r)
    prolora-full: up = B_par + B_perp,   down = A_par + A_perp      (rank <= r)
    subspace:     up = B_par,            down = A_par
    copy:         up = B,                down = A
    """
    if method == "copy":
        return B, A
    dtype = dtype or torch.float64
    B, A, Us, Vs, Ut, Vt = (x.to(dtype) for x in (B, A, Us, Vs, Ut, Vt))
    B_par, B_perp = _left(B, Us, Ut)
    At_par, At_perp = _left(A.T, Vs, Vt)  # the right side is the left side of A^T
    A_par, A_perp = At_par.T, At_perp.T
    if method == "prolora":
        return torch.cat([B_par, B_perp], dim=1), torch.cat([A_par, A_perp], dim=0)
    if method == "prolora-full":
        return B_par + B_perp, A_par + A_perp
    if method == "subspace":
        return B_par, A_par
    raise ValueError(f"unknown method {method!r}")


@project_lora.register("torch", priority=10)
def _project_torch(B, A, Us, Vs, Ut, Vt, method: str, dtype: torch.dtype | None = None):
    """The same thin-GEMM chain in float32 (or `dtype`): what every device runs fast."""
    return _project_reference(B, A, Us, Vs, Ut, Vt, method, dtype=dtype or torch.float32)
