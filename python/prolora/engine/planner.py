"""The chunk and pass planner: which modules compute together (a chunk, sized to the host and
device budgets) and which LoRAs of a batch share a pass over the models (their inputs stay
resident for the pass); for extract, which layers' differences compute together. Pure
arithmetic over shapes and sizes: it reads nothing."""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence, TypeVar

from ..checkpoints import BaseModel

T = TypeVar("T")

# the chunk computing plus the next one's raw weights in flight share the budget
IN_FLIGHT = 1.5
# an extract pass: a chunk of differences takes at most this share of the budget (the chunk
# computing, the next one's raw weights in flight, and the heap's slack between them)
DIFFERENCE_SHARE = 4
# bytes per element of a stored weight, by its dtype's name (safetensors' and torch's spellings)
ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "float16": 2, "bfloat16": 2, "float32": 4}


def module_bytes(shape: tuple[int, ...], raw_itemsize: int, weights: int) -> int:
    """Working memory for one module whose `weights` (0-2) weights must be loaded: raw bytes,
    float32 copies, Gram matrix, eigenvectors and workspace, and the bases kept."""
    m, n = shape[0], math.prod(shape[1:])
    d = min(m, n)
    per_weight = m * n * (raw_itemsize + 4) + 3 * 4 * d * d
    bases = 2 * 4 * (m + n) * d
    return weights * per_weight + bases


def module_need(model: BaseModel, module: str) -> int:
    """module_bytes of a module whose source and target weights are both read."""
    ref = model.weights[module]
    return module_bytes(ref.shape, 2 if ref.dtype in ("F16", "BF16") else 4, 2)


def consecutive(items: Sequence[T], size: Callable[[T], int], limit: float) -> list[list[T]]:
    """Consecutive groups of `items` whose sizes add up to at most `limit` (at least one item
    per group): the chunks of a pass over a model."""
    out: list[list[T]] = []
    cur: list[T] = []
    used = 0
    for x in items:
        n = size(x)
        if cur and used + n > limit:
            out.append(cur)
            cur, used = [], 0
        cur.append(x)
        used += n
    if cur:
        out.append(cur)
    return out


def chunk_modules(modules: list[str], need: Mapping[str, int] | None, limit: float,
                  model: BaseModel | None = None) -> list[list[str]]:
    """Consecutive modules whose working memory (need[m], else module_need(model, m)) adds up
    to at most `limit` bytes; at least one module per chunk."""
    return consecutive(modules, (lambda m: need[m]) if need is not None else (lambda m: module_need(model, m)), limit)


def raw_itemsize(model: BaseModel) -> int:
    """The largest item size among a model's stored weights (4 where the dtype is unknown)."""
    return max((ITEMSIZE.get(r.dtype, 4) for r in model.weights.values()), default=4)


def difference_bytes(shape: tuple[int, ...], raw_itemsizes: int) -> int:
    """Working memory for one layer's difference (extract): the raw weights of every checkpoint
    read (`raw_itemsizes`: their item sizes summed), the float32 difference in the SVD's batch
    and the SVD's working copy."""
    return shape[0] * math.prod(shape[1:]) * (raw_itemsizes + 8)


def difference_chunks(items: Sequence[T], size: Callable[[T], int], budget: int) -> list[list[T]]:
    """Consecutive layers of an extract pass whose difference_bytes add up to at most a
    DIFFERENCE_SHARE of the budget (at least one layer per chunk)."""
    return consecutive(items, size, max(budget // DIFFERENCE_SHARE, 1))


def chunk_limit(host_budget: int, host_resident: int, device_budget: int | None) -> float:
    """Bytes one chunk may take, shared with the next chunk in flight: on the CPU what the host
    budget leaves over what is resident; on a GPU (`device_budget` given) the device budget
    alone. A GPU chunk lives on the device: its weights pass through a bounded pinned staging
    ring (engine/device.py) and its results come back a layer at a time, so the chunk's size
    costs the host nothing and the host budget does not bound it."""
    if device_budget is not None:
        return device_budget / IN_FLIGHT
    return max(host_budget - host_resident, 0) / IN_FLIGHT


def lora_passes(sizes: list[int], spare: int) -> list[list[int]]:
    """Consecutive groups of a batch's LoRAs (by index) whose inputs, resident for a whole pass
    over the models, take at most two thirds of `spare` (what the memory budget leaves): the
    rest is the chunks' working memory. At least one LoRA per pass."""
    limit = max(spare, 0) * 2 // 3
    out: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if not out or (used + size > limit and out[-1]):
            out.append([])
            used = 0
        out[-1].append(i)
        used += size
    return out
