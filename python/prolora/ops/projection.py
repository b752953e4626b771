"""project_lora: the exact low-rank ProLoRA projection of a LoRA (docs/method.md), never forming m x n."""
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
    left, right = _rows(B.T, Us, Ut, Ml), _rows(A, Vs, Vt, Mr)
    return _assemble(method, [t.T for t in left], list(right))


GROUP = 4  # LoRAs per stacked product (fixed: see project_group)


def _assemble(method: str, ups: list[torch.Tensor], downs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) from the side results: [sum] for prolora-full, [par, perp] otherwise."""
    if method in ("prolora-full", "subspace"):
        return ups[0], downs[0]
    if method == "prolora":
        return torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    raise ValueError(f"unknown method {method!r}")


def project_group(factors: list[tuple[torch.Tensor, torch.Tensor]], Us: torch.Tensor, Vs: torch.Tensor,
                  Ut: torch.Tensor, Vt: torch.Tensor, method: str, dtype: torch.dtype | None = None,
                  cross: tuple[torch.Tensor, torch.Tensor] | None = None,
                  group: int = GROUP) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """project_lora for many LoRAs (B_i, A_i) on one module, in float32 (or `dtype`): LoRAs of the
    same shape are stacked `group` at a time into one product per side. A thin product costs
    about as much at 64 rows as at 16 (reading the basis dominates), so a batch pays a quarter.
    Every stack has the same shape, the last one padded with zero rows, and products of equal
    shape run the same instructions on every row: a LoRA gets the bits it gets alone, in any
    batch and any position (tested)."""
    if method == "copy":
        return list(factors)
    dtype = dtype or torch.float32
    Us, Vs, Ut, Vt = (x.to(dtype) for x in (Us, Vs, Ut, Vt))
    Ml, Mr = cross if cross is not None else (None, None)
    out: list = [None] * len(factors)
    stacks: dict[tuple[int, int, int], list[int]] = {}
    for i, (B, A) in enumerate(factors):
        stacks.setdefault((B.shape[0], B.shape[1], A.shape[1]), []).append(i)
    for (m, r, n), idx in stacks.items():
        for g in range(0, len(idx), group):
            members = idx[g:g + group]
            Xl = torch.zeros(group * r, m, dtype=dtype, device=Us.device)
            Xr = torch.zeros(group * r, n, dtype=dtype, device=Us.device)
            for s, i in enumerate(members):
                Xl[s * r:(s + 1) * r] = factors[i][0].T
                Xr[s * r:(s + 1) * r] = factors[i][1]
            if method == "prolora-full":
                left, right = (_rows(Xl, Us, Ut, Ml, summed=True),), (_rows(Xr, Vs, Vt, Mr, summed=True),)
            else:
                left, right = _rows(Xl, Us, Ut, Ml), _rows(Xr, Vs, Vt, Mr)
            for s, i in enumerate(members):
                rows = slice(s * r, (s + 1) * r)  # copies: a result must not pin its whole stack
                out[i] = _assemble(method, [t[rows].clone().T for t in left], [t[rows].clone() for t in right])
    return out


@project_lora.register("torch", priority=10, batched=lambda items, *a, **kw: project_group(items, *a, **kw))
def _project_torch(B, A, Us, Vs, Ut, Vt, method: str, dtype: torch.dtype | None = None, cross=None):
    """The same thin-GEMM chain in float32 (or `dtype`): what every device runs fast. One LoRA
    goes through project_group too, so that alone and in a batch it gets the same bits."""
    return project_group([(B, A)], Us, Vs, Ut, Vt, method, dtype=dtype, cross=cross)[0]
