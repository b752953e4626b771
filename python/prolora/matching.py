"""Layer matching between models whose block depths differ (SDXL -> SSD-1B), over the block
layout the family gives (families.Family.block_of).

Names alone cannot say which source block a shallower target's block 3 came from, so blocks are
matched by subspace similarity: for every attention module present in both models, each target
transformer block is assigned a distinct source block of the same attention module, maximising
the summed similarity (mean phi over the block's linears of equal role and shape). Source blocks
left unassigned have no counterpart in the target. Target blocks that get no source block (a
target deeper than the source, or an attention module the source lacks) are listed too, with
source_block None, so that every target block is either matched or reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .ops import Basis, phi

# a family's block layout (families.Family.block_of): module -> (block group, index, role) or None
BlockOf = Callable[[str], "tuple[str, int, str] | None"]


def blocks(weights: dict, block_of: BlockOf | None) -> dict[str, dict[int, dict[str, tuple[tuple, str]]]]:
    """block group -> block index -> role -> (weight shape, module id)."""
    out: dict[str, dict[int, dict[str, tuple[tuple, str]]]] = {}
    if block_of is None:
        return out
    for module, ref in weights.items():
        hit = block_of(module)
        if hit:
            attn, idx, role = hit
            out.setdefault(attn, {}).setdefault(idx, {})[role] = (tuple(ref.shape), module)
    return out


def depths_differ(source_weights: dict, target_weights: dict, block_of: BlockOf | None) -> bool:
    """True when some block group (an SD attention module) has a different number of blocks."""
    s, t = blocks(source_weights, block_of), blocks(target_weights, block_of)
    return any(len(s[a]) != len(t.get(a, {})) for a in s) or any(a not in s for a in t)


def assign(score: list[list[float]]) -> list[int]:
    """Maximum-weight assignment of rows (target blocks) to distinct columns (source blocks).

    Rows must not outnumber columns. Returns the column of each row. Hungarian algorithm
    (shortest augmenting paths with potentials), O(rows^2 * cols)."""
    n, m = len(score), len(score[0]) if score else 0
    if n > m:
        raise ValueError(f"{n} rows cannot take distinct columns among {m}")
    big = max((abs(x) for row in score for x in row), default=0.0) + 1.0
    cost = [[big - x for x in row] for row in score]  # minimise
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    owner = [0] * (m + 1)  # column -> row (1-based, 0 = free)
    for i in range(1, n + 1):
        owner[0] = i
        j0 = 0
        minv = [math.inf] * (m + 1)
        used = [False] * (m + 1)
        way = [0] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = owner[j0], math.inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    col = [0] * n
    for j in range(1, m + 1):
        if owner[j]:
            col[owner[j] - 1] = j - 1
    return col


@dataclass
class BlockMatch:
    attention: str
    target_block: int
    source_block: int | None  # None: no source block for this target block (it gets no LoRA)
    score: float  # mean phi over the block's compared linears (0.0 when unmatched)


BasisOf = Callable[[str, str, int | None], Basis]  # (side, module, k) -> basis; side "source"/"target"


def match_blocks(source_weights: dict, target_weights: dict, basis_of: BasisOf, block_of: BlockOf | None,
                 roles: tuple[str, ...] | None = None) -> list[BlockMatch]:
    """Assign every target transformer block to a source block of the same attention module,
    for the attention modules whose depths differ.

    `basis_of(side, module, k)` gives a basis (k=None: the module's own k from the subspace mode);
    the target side is asked at the source module's k. `roles` limits the compared linears."""
    s_blocks, t_blocks = blocks(source_weights, block_of), blocks(target_weights, block_of)
    out: list[BlockMatch] = []
    for attn, t_idx in t_blocks.items():
        s_idx = s_blocks.get(attn)
        if not s_idx:  # an attention module the source lacks: reported, nothing lands there
            out += [BlockMatch(attn, tb, None, 0.0) for tb in sorted(t_idx)]
            continue
        if sorted(s_idx) == sorted(t_idx):
            continue  # same depth: names are trusted there
        t_list, s_list = sorted(t_idx), sorted(s_idx)
        score = []
        for tb in t_list:
            row = []
            for sb in s_list:
                common = [r for r, (shape, _) in t_idx[tb].items()
                          if r in s_idx[sb] and s_idx[sb][r][0] == shape and (roles is None or r in roles)]
                vals = []
                for role in common:
                    src = basis_of("source", s_idx[sb][role][1], None)
                    tgt = basis_of("target", t_idx[tb][role][1], src.k)
                    vals.append(0.5 * (phi(src.U, tgt.U) + phi(src.V, tgt.V)))
                row.append(sum(vals) / len(vals) if vals else 0.0)
            score.append(row)
        if len(t_list) <= len(s_list):
            cols = assign(score)
            out += [BlockMatch(attn, tb, s_list[c], score[i][c]) for i, (tb, c) in enumerate(zip(t_list, cols))]
        else:  # a deeper target: each source block goes to its best distinct target block
            transposed = [list(col) for col in zip(*score)]
            rows = assign(transposed)
            out += [BlockMatch(attn, t_list[r], sb, transposed[i][r]) for i, (sb, r) in enumerate(zip(s_list, rows))]
            out += [BlockMatch(attn, tb, None, 0.0) for r, tb in enumerate(t_list) if r not in set(rows)]
    return out


def block_mapping(source_weights: dict, target_weights: dict, matches: list[BlockMatch],
                  block_of: BlockOf | None) -> dict[str, str | None]:
    """Source module -> target module (None: its block has no counterpart) for every linear of
    the block groups that were matched; other modules keep their names."""
    t_blocks = blocks(target_weights, block_of)
    assigned = {(m.attention, m.source_block): m.target_block for m in matches if m.source_block is not None}
    matched = {m.attention for m in matches if m.source_block is not None}
    out: dict[str, str | None] = {}
    for module in source_weights:
        hit = block_of(module) if block_of is not None else None
        if hit and hit[0] in matched:
            attn, idx, role = hit
            tb = assigned.get((attn, idx))
            there = t_blocks.get(attn, {}).get(tb, {}).get(role) if tb is not None else None
            out[module] = None if there is None else there[1]
    return out
