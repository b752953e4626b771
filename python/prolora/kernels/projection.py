"""The ProLoRA projection of a batch of LoRA layers (docs/method.md) with Triton kernels:
[P_Ut P_Us B | Q_Ut Q_Us B] and the same for A^T with V_s, V_t, never forming m x n.

Per side X (m x r) with U_s, U_t (m x k), in O(m k r) work (no k x k product):
    S = U_s^T X,  T = U_t^T X                 (tn: reductions over m)
    P = U_s S                                  (expand: P_Us X)
    Y = U_t^T P                                (tn)
    par  = U_t Y                               = P_Ut P_Us X
    perp = X - U_s S - U_t (T - Y)             = Q_Ut Q_Us X          (one expand pass, both outputs)
Inputs may be float16/bfloat16/float32 with any strides; products accumulate in float32 and the
outputs are float32, written straight into the concatenated factors (the A side through a
transposed view), so nothing is copied.
"""
from __future__ import annotations

import torch

from ..ops.projection import METHODS  # the one list of methods (the CLI's choices)
from .lowrank import expand
from .tn import tn


def _side(X: torch.Tensor, Us: torch.Tensor, Ut: torch.Tensor, par: torch.Tensor | None,
          perp: torch.Tensor | None, add: bool) -> None:
    """Writes P_Ut P_Us X into `par` and Q_Ut Q_Us X into `perp` (or their sum into `par`)."""
    S, _ = tn(Us, X)
    P = torch.empty(X.shape, dtype=torch.float32, device=X.device)
    expand(Us, S, out_a=P)
    Y, _ = tn(Ut, P)
    if perp is None and not add:
        expand(Ut, Y, out_a=par)
        return
    T, _ = tn(Ut, X)
    expand(Ut, Y, out_a=par, u2=Us, c2=-S, c3=Y - T, x=X, out_b=perp, add=add)


def project_batched(B: torch.Tensor, A: torch.Tensor, Us: torch.Tensor, Vs: torch.Tensor,
                    Ut: torch.Tensor, Vt: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """B (b, m, r), A (b, r, n), U_s/U_t (b, m, k), V_s/V_t (b, n, k) -> (up, down), float32:
    prolora (b, m, 2r) and (b, 2r, n); prolora-full and subspace (b, m, r) and (b, r, n);
    copy returns B and A unchanged."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    if method == "copy":
        return B, A
    b, m, r = B.shape
    n = A.shape[2]
    if A.shape[:2] != (b, r) or Us.shape[:2] != (b, m) or Ut.shape != Us.shape \
            or Vs.shape[:2] != (b, n) or Vt.shape != Vs.shape:
        raise ValueError(f"project_batched: shapes B {tuple(B.shape)}, A {tuple(A.shape)}, "
                         f"Us {tuple(Us.shape)}, Ut {tuple(Ut.shape)}, Vs {tuple(Vs.shape)}, "
                         f"Vt {tuple(Vt.shape)} do not match")
    width = 2 * r if method == "prolora" else r
    up = torch.empty(b, m, width, dtype=torch.float32, device=B.device)
    down = torch.empty(b, width, n, dtype=torch.float32, device=B.device)
    downT = down.transpose(1, 2)  # (b, n, width): the A side is the left side of A^T
    for X, U, V, out in ((B, Us, Ut, up), (A.transpose(1, 2), Vs, Vt, downT)):
        if method == "prolora":
            _side(X, U, V, out[:, :, :r], out[:, :, r:], add=False)
        elif method == "prolora-full":
            _side(X, U, V, out, None, add=True)
        else:  # subspace
            _side(X, U, V, out, None, add=False)
    return up, down


def project(B: torch.Tensor, A: torch.Tensor, Us: torch.Tensor, Vs: torch.Tensor, Ut: torch.Tensor,
            Vt: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer: B (m, r), A (r, n), bases (m, k) / (n, k) -> (up, down) as project_batched."""
    if method == "copy":
        return B, A
    up, down = project_batched(B[None], A[None], Us[None], Vs[None], Ut[None], Vt[None], method)
    return up[0], down[0]
