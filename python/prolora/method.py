"""One layer's transfer math (docs/method.md) as pure functions over tensors; no files, no I/O."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import OptionError
from .ops import Basis, phi_null, project_lora, small_svd, subspace_phi
from .ops.registry import problem_for
from .ops.projection import METHODS
from .report import LayerRecord


@dataclass(frozen=True)
class KMode:
    """How k (the subspace dimension) is chosen from the source weight's spectrum.

    energy:F  smallest k with cumulative sigma^2 >= F * ||W||_F^2
    ratio:F   k = round(F * min(m, n))
    rank:K    k = min(K, min(m, n))
    """

    kind: str
    value: float

    @classmethod
    def parse(cls, spec: "str | KMode") -> "KMode":
        if isinstance(spec, KMode):
            return spec
        kind, sep, val = str(spec).partition(":")
        try:
            value = float(val)
        except ValueError:
            value = float("nan")
        if not sep or kind not in ("energy", "ratio", "rank"):
            raise OptionError(f"subspace mode {spec!r}: expected energy:F, ratio:F or rank:K")
        if kind in ("energy", "ratio") and not 0.0 < value <= 1.0:
            raise OptionError(f"subspace mode {spec!r}: F must be in (0, 1]")
        if kind == "rank" and not (value >= 1 and value == int(value)):
            raise OptionError(f"subspace mode {spec!r}: K must be a positive integer")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind}:{int(self.value) if self.kind == 'rank' else self.value:g}"

    def needs_spectrum(self) -> bool:
        return self.kind == "energy"

    def choose(self, dim: int, S: torch.Tensor | None = None, energy: float | None = None) -> int:
        """k for a weight whose smaller side is `dim`; energy mode needs the spectrum S."""
        if self.kind == "rank":
            return max(1, min(int(self.value), dim))
        if self.kind == "ratio":
            return max(1, min(dim, round(self.value * dim)))
        assert S is not None, "energy mode needs the spectrum"
        s2 = S.double() ** 2
        total = float(energy) if energy is not None else float(s2.sum())
        if total <= 0.0:
            return 1
        cum = torch.cumsum(s2, 0) / total
        # a tiny tolerance so that F = 1.0 is reachable despite rounding in the sum
        hit = torch.nonzero(cum >= self.value - 1e-12)
        if hit.numel() == 0:
            return S.numel() if S.numel() >= dim else -1  # -1: partial spectrum too short
        return int(hit[0]) + 1


@dataclass(frozen=True)
class RankSpec:
    """Output rank: 'same' (compress to the input rank r), '2r' (exact, no compression), or N."""

    kind: str
    value: int = 0

    @classmethod
    def parse(cls, spec: "str | int | RankSpec") -> "RankSpec":
        if isinstance(spec, RankSpec):
            return spec
        s = str(spec)
        if s in ("same", "2r"):
            return cls(s)
        if s.isdigit() and int(s) > 0:
            return cls("fixed", int(s))
        raise OptionError(f"rank {spec!r}: expected same, 2r or a positive integer")

    def target(self, r_in: int, natural: int) -> int:
        """The rank to write for a LoRA of input rank r_in whose exact output has rank `natural`."""
        if self.kind == "2r":
            return natural
        want = r_in if self.kind == "same" else self.value
        return min(want, natural)

    def __str__(self) -> str:
        return str(self.value) if self.kind == "fixed" else self.kind


@dataclass
class FactorSVD:
    """The thin SVD of up @ down from the factors alone: up = Q1 R1, down^T = Q2 R2, and the SVD
    Uc diag(S) Vh of the small core R1 R2^T, so up @ down = (Q1 Uc) diag(S) (Q2 Vh^T)^T exactly.
    Cost O((m + n) r^2 + r^3), never a dense m x n matrix."""

    Q1: torch.Tensor
    Uc: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    Q2: torch.Tensor

    @property
    def U(self) -> torch.Tensor:
        return self.Q1 @ self.Uc

    @property
    def V(self) -> torch.Tensor:
        return self.Q2 @ self.Vh.T

    def split(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced factors (up (m, k), down (k, n)) of the best rank-k approximation: sqrt of the
        singular values on each side, so that neither side's values dwarf the other's in float16."""
        root = self.S[:k].sqrt()
        return (self.Q1 @ self.Uc[:, :k]) * root, root[:, None] * (self.Vh[:k] @ self.Q2.T)

    def retained(self, k: int) -> float:
        """The share of the Frobenius energy the top k singular values keep, in [0, 1] (1 for zero)."""
        sq = self.S.double() ** 2
        total, kept = torch.stack([sq.sum(), sq[:k].sum()]).tolist()  # one read (a GPU waits once)
        return kept / total if total > 0.0 else 1.0


def factor_svd(up: torch.Tensor, down: torch.Tensor, override: str | None = None) -> FactorSVD:
    """FactorSVD of up (m, r) @ down (r, n), in their dtype; the core's SVD is the small_svd op's,
    dispatched on the core (native Jacobi where it wins), or the `override` backend."""
    Q1, R1 = torch.linalg.qr(up)
    Q2, R2 = torch.linalg.qr(down.T)
    core = R1 @ R2.T  # r x r at most
    Uc, Sc, Vch = small_svd.choose(problem_for(core), override).backend.fn(core)
    return FactorSVD(Q1, Uc, Sc, Vch, Q2)


def compress(up: torch.Tensor, down: torch.Tensor, rank: int,
             override: str | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of up @ down (QR of each side, SVD of the small core).

    Returns balanced factors (sqrt of the singular values on each side) and the retained share
    of the Frobenius energy, in [0, 1]. `override` forces the small_svd backend of the core.
    """
    f = factor_svd(up, down, override)
    new_up, new_down = f.split(rank)
    return new_up, new_down, f.retained(rank)


@dataclass
class LayerMath:
    """The outcome of one layer: factors with the scale folded in (dW_t = up @ down; None when
    not transferred) and the record of the verdict and the similarity figures that decided it."""

    up: torch.Tensor | None
    down: torch.Tensor | None
    record: LayerRecord


@dataclass
class Similarity:
    """One module's source-target similarity, shared by every LoRA on it: phi on both sides, the
    null-space similarities derived from them (no extra SVD), and the cross products
    (Ut^T Us, Vt^T Vs) they come from, which the projection reuses."""

    sims: dict[str, float | None]
    cross: tuple[torch.Tensor, torch.Tensor]


def similarity(src: Basis, tgt: Basis, shape: tuple[int, int]) -> Similarity:
    return similarity_many([(src, tgt, shape)])[0]


def similarity_many(items: list[tuple[Basis, Basis, tuple[int, int]]]) -> list[Similarity]:
    """similarity(src, tgt, shape) of many modules, their figures read in one go: on a GPU the
    host waits once for all of them instead of twice per module."""
    crosses = [(tgt.U.T @ src.U.to(tgt.U.dtype), tgt.V.T @ src.V.to(tgt.V.dtype)) for src, tgt, _ in items]
    sums = [(M.double() ** 2).sum() / src.k for (src, _, _), pair in zip(items, crosses) if src.k for M in pair]
    values = iter(torch.stack(sums).tolist() if sums else [])
    out = []
    for (src, _, (m, n)), (Ml, Mr) in zip(items, crosses):
        k = src.k
        pl, pr = (next(values), next(values)) if k else (1.0, 1.0)
        out.append(Similarity({"phi_left": pl, "phi_right": pr, "phi_null_left": phi_null(pl, m, k),
                               "phi_null_right": phi_null(pr, n, k)}, (Ml, Mr)))
    return out


def similarities(pairs: dict[str, tuple[Basis, Basis]], shapes: dict[str, tuple[int, int]],
                 override: str | None = None) -> dict[str, dict[str, float | None]]:
    """similarity()'s figures (phi and phi_null on both sides) of many layers at once, for when
    the cross products are not needed (the similarity report): one subspace_phi call per side
    for all the layers of a shape and k, dispatched on that batch. `override` forces a backend."""
    groups: dict[tuple, list[str]] = {}
    for name, (src, tgt) in pairs.items():
        groups.setdefault((shapes[name], src.k, tgt.k), []).append(name)
    out: dict[str, dict[str, float | None]] = {}
    for ((m, n), k, _), names in groups.items():
        phis = []
        for side in ("U", "V"):
            A = torch.stack([getattr(pairs[x][0], side) for x in names])
            B = torch.stack([getattr(pairs[x][1], side) for x in names])
            backend = subspace_phi.choose(problem_for(A, k=k), override).backend
            phis.append(backend.fn(A, B).tolist())
        for x, pl, pr in zip(names, *phis):
            out[x] = {"phi_left": pl, "phi_right": pr, "phi_null_left": phi_null(pl, m, k),
                      "phi_null_right": phi_null(pr, n, k)}
    return out


def _shared_rotation(Us: torch.Tensor, Ut: torch.Tensor) -> tuple[torch.Tensor, float]:
    """For bases of different lengths: the rotation R (ks x kt) that best carries Us onto Ut on
    their shared leading coordinates (orthogonal Procrustes), and phi measured there."""
    c = min(Us.shape[0], Ut.shape[0])
    M = Us[:c].T @ Ut[:c]
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    # phi against the source subspace as it appears on those coordinates (orthonormalised)
    Q = torch.linalg.qr(Us[:c])[0]
    overlap = Q.T @ Ut[:c]
    return U @ Vh, float((overlap.double() ** 2).sum()) / max(1, min(overlap.shape))


def transfer_layer_widths(B: torch.Tensor, A: torch.Tensor, src: Basis, tgt: Basis, *, tau: float,
                          rank: RankSpec, r_in: int, svd: str | None = None) -> LayerMath:
    """LoRA-X's least-squares map for a target weight of another shape (docs/method.md, "Layers of another
    width"): dW_t = P_L dW_s P_R^T with P = argmin ||P U_s - U_t||, i.e. P_L = U_t R_L^T U_s^T,
    where R_L pairs the two k-dim subspaces through the coordinates both widths share (the
    leading channels). Only the subspace part moves (no complement: it has no counterpart).
    Refused when the subspaces disagree on those coordinates (min phi < tau)."""
    RL, pl = _shared_rotation(src.U, tgt.U)
    RR, pr = _shared_rotation(src.V, tgt.V)
    common = dict(k=src.k, gap=src.gap(), phi_left=pl, phi_right=pr)
    worst = min(pl, pr)
    shapes = f"{B.shape[0]}x{A.shape[1]} -> {tgt.U.shape[0]}x{tgt.V.shape[0]}"
    if worst < tau:
        return LayerMath(None, None, LayerRecord(
            transferred=False, reason=f"widths differ ({shapes}) and on their shared coordinates "
            f"min(phi)={worst:.3f} < tau={tau:g}: a least-squares map would be meaningless", **common))
    up = tgt.U @ (RL.T @ (src.U.T @ B))
    down = ((A @ src.V) @ RR) @ tgt.V.T
    retained = None
    out_rank = rank.target(r_in, up.shape[1])
    if out_rank < up.shape[1]:
        up, down, retained = compress(up, down, out_rank, svd)
    return LayerMath(up, down, LayerRecord(transferred=True, reason=f"transferred across widths ({shapes}, "
                                           "least-squares map)", retained_energy=retained, **common))


def transfer_layer(B: torch.Tensor | None, A: torch.Tensor | None, src: Basis, tgt: Basis, *, method: str,
                   tau: float, rank: RankSpec, r_in: int, project=None, svd: str | None = None,
                   shared: Similarity | None = None, projected=None) -> LayerMath:
    """Transfer one LoRA layer. B (m x r) has the scale folded in, A is (r x n); src and tgt
    are the source and target bases at the same k. `project` is a project_lora backend;
    `svd` forces the small_svd backend of the compression (--backend);
    `shared` is similarity(src, tgt) when the caller has it (one per module for many LoRAs);
    `projected` is this LoRA's (up, down) when the caller projected many at once (then B and A
    may be None: with `shared` given they are not read)."""
    if method not in METHODS or method == "copy":
        raise OptionError(f"transfer_layer: method {method!r} (copy needs no bases)")
    shared = shared or similarity(src, tgt, (B.shape[0], A.shape[1]))
    sims = shared.sims
    common = dict(k=src.k, gap=src.gap(), **sims)
    worst = min(sims["phi_left"], sims["phi_right"])
    if worst < tau:
        return LayerMath(None, None, LayerRecord(transferred=False, reason=f"min(phi)={worst:.3f} < tau={tau:g}",
                                                 **common))
    if projected is not None:
        up, down = projected
    else:
        project = project or project_lora.reference.fn
        up, down = project(B, A, src.U, src.V, tgt.U, tgt.V, method, cross=shared.cross)
    out_rank = rank.target(r_in, up.shape[1])
    retained = None
    if out_rank < up.shape[1]:
        up, down, retained = compress(up, down, out_rank, svd)
    return LayerMath(up, down, LayerRecord(transferred=True, reason="transferred", retained_energy=retained,
                                           **common))
