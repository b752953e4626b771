"""project_lora: the exact low-rank ProLoRA projection of a LoRA (METHOD.md), never forming m x n."""
from __future__ import annotations

import torch

from .registry import Op

METHODS = ("prolora", "prolora-full", "subspace", "copy")

project_lora = Op("project_lora", "project a LoRA (B, A) from source to target singular subspaces")


def _left(B, Us, Ut, M=None, summed: bool = False):
    """(B_par, B_perp) = (P_Ut P_Us B, Q_Ut Q_Us B), or their sum when `summed`, as thin
    products only: O(m k r). M = Ut^T Us (k x k) is O(m k^2) to form, so it is used only when
    given: the similarity gate has formed it already, once per module for every LoRA, and with it
    four thin products do instead of six (Ut^T P_Us B = M a, Ut^T Q_Us B = c - M a)."""
    a = Us.T @ B
    if M is None:
        PB = Us @ a
        B_par = Ut @ (Ut.T @ PB)
        QB = B - PB
        B_perp = QB - Ut @ (Ut.T @ QB)
        return B_par + B_perp if summed else (B_par, B_perp)
    c = Ut.T @ B
    Ma = M.to(a.dtype) @ a
    if summed:  # B_par + B_perp = B - Us a + Ut (2 M a - c)
        return B - Us @ a + Ut @ (2 * Ma - c)
    r = B.shape[1]
    both = Ut @ torch.cat([Ma, c - Ma], dim=1)
    return both[:, :r], B - Us @ a - both[:, r:]


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
        return _left(B, Us, Ut, Ml, summed=True), _left(A.T, Vs, Vt, Mr, summed=True).T
    B_par, B_perp = _left(B, Us, Ut, Ml)
    At_par, At_perp = _left(A.T, Vs, Vt, Mr)  # the right side is the left side of A^T
    A_par, A_perp = At_par.T, At_perp.T
    if method == "prolora":
        return torch.cat([B_par, B_perp], dim=1), torch.cat([A_par, A_perp], dim=0)
    if method == "subspace":
        return B_par, A_par
    raise ValueError(f"unknown method {method!r}")


@project_lora.register("torch", priority=10)
def _project_torch(B, A, Us, Vs, Ut, Vt, method: str, dtype: torch.dtype | None = None, cross=None):
    """The same thin-GEMM chain in float32 (or `dtype`): what every device runs fast."""
    return _project_reference(B, A, Us, Vs, Ut, Vt, method, dtype=dtype or torch.float32, cross=cross)
