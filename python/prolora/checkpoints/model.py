"""The interface every base-model reader provides: BaseModel (weights, spellings, lazy loads,
content identity) and WeightRef. Each family's readers (prolora.families) build it."""
from __future__ import annotations

import hashlib
import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import torch

from ..errors import ModelError
from ..safetensors_io import ITEMSIZE, Header, SafetensorsFile

# identity sampling: per canonical weight, _ID_RUNS evenly spaced runs of up to _ID_RUN_ELEMENTS
# elements (inside one row), so that a change confined to one weight still changes the identity;
# ~1500 weights of SDXL x 4 x 16 fp16 elements = ~190 KiB read, whatever the model's size
_ID_VERSION = b"prolora-model-identity-v2\0"
_ID_RUNS = 4
_ID_RUN_ELEMENTS = 16


@dataclass(frozen=True)
class WeightRef:
    """Where one LoRA-able weight (linear or conv) of a base model lives.

    `module` is the canonical id: component + diffusers/transformers path of the module, e.g.
    ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` or
    ``text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj``.
    `rows` is a row range of the stored tensor for fused weights (OpenCLIP in_proj_weight, Flux
    qkv / linear1); `pieces`, where set, are several row ranges concatenated in order (Flux's final
    adaLN modulation, whose two halves diffusers stores swapped).
    `transposed` marks tensors stored as [in, out] (OpenCLIP text_projection).
    `shape` is the weight's own shape (after slicing/transposing): (out, in) or (out, in, kh, kw).
    """

    module: str
    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str
    rows: tuple[int, int] | None = None
    transposed: bool = False
    pieces: tuple[tuple[int, int], ...] | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Slice:
    """One canonical module inside a fused LoRA module: the up rows `rows` (ranges, concatenated in
    order) are that module's output rows."""

    module: str
    rows: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class FusedHit:
    """A LoRA module key that adapts a fused weight: how the file spells it, how many rows its up
    has, and the canonical modules its rows belong to."""

    spelling: str
    rows: int
    slices: tuple[Slice, ...]


def _flat(path: str) -> str:
    return path.replace(".", "_")


@dataclass(eq=False)
class BaseModel:
    """A base checkpoint opened by its headers only: every LoRA-able weight by canonical module
    id, the spellings LoRA files use for them, lazy tensor loads and a content identity.

    Each family's package subclasses it with its key maps (`spell`, `_add_aliases`, the fused and
    hint hooks); build one with `prolora.families.open_model(path)`.
    """

    path: Path
    name: str
    layout: str  # "diffusers" | "single-file"
    family: str  # a member of a registered family (prolora.families), or "unknown"
    weights: dict[str, WeightRef]
    files: dict[str, Path] = field(repr=False)  # role (relative name) -> file, every file involved
    headers: dict[Path, Header] = field(repr=False)
    text_encoders: dict[str, dict] = field(default_factory=dict, repr=False)  # component -> facts
    _handles: dict[Path, SafetensorsFile] = field(default_factory=dict, repr=False)
    # tensors held in memory by pseudo-file (checkpoints.memory): read instead of files, never closed
    resident: dict[Path, "TensorSource"] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _aliases: dict[str, tuple[str, str]] | None = field(default=None, repr=False)
    _identity: str | None = field(default=None, repr=False)

    def _alias_adder(self, table: dict[str, tuple[str, str]]):
        """add(alias, module, spelling) into `table`, refusing an alias that would name two modules."""
        def add(alias: str, module: str, spelling: str) -> None:
            old = table.get(alias)
            if old is not None and old[0] != module:
                raise ModelError(f"{self.path}: LoRA key '{alias}' would name both '{old[0]}' and '{module}'")
            table[alias] = (module, spelling)
        return add

    def _alias_table(self) -> dict[str, tuple[str, str]]:
        """{LoRA module key: (canonical module, spelling)}, built once by `_add_aliases`."""
        if self._aliases is None:
            table: dict[str, tuple[str, str]] = {}
            self._add_aliases(self._alias_adder(table))
            self._aliases = table
        return self._aliases

    # the kohya spelling this family's trainers write ("kohya-ldm": original names flattened)
    kohya_spelling = "kohya-ldm"

    def spell(self, module: str, spelling: str) -> str:
        """The LoRA module key for canonical `module` in `spelling` (inverse of `resolve`). Each
        family's model class defines it."""
        raise NotImplementedError(f"{type(self).__name__} defines no LoRA key spellings")

    def _add_aliases(self, add) -> None:
        """Register every key a LoRA file may spell a module of this model with:
        add(alias, module, spelling). Each family's model class defines it."""
        raise NotImplementedError(f"{type(self).__name__} defines no LoRA key spellings")

    def resolve(self, lora_key: str) -> tuple[str, str] | None:
        """(canonical module id, spelling) for a LoRA module key as a file spells it, or None."""
        return self._alias_table().get(lora_key)

    # Fused-layer hooks (used by the plan): by default no LoRA module is fused; a family with fused
    # weights (FLUX.1's qkv and linear1) overrides them.
    def resolve_fused(self, lora_key: str) -> "FusedHit | None":
        """For a LoRA key that adapts a fused weight (several canonical modules stacked by rows,
        e.g. Flux's img_attn.qkv): its spelling and which up rows are which module. Else None."""
        return None

    def spell_fused(self, module: str, spelling: str) -> tuple[str, int, tuple[tuple[int, int], ...]] | None:
        """Where `module` goes in a `spelling` that fuses it with others: (LoRA module key, rows of
        that module's up, the up row ranges that are `module`'s rows). None: `spell()` names it whole."""
        return None

    def unspellable(self, module: str, spelling: str) -> str | None:
        """Why `module` has no name in `spelling` (the output then drops it), or None."""
        return None

    def pipeline_component(self, component: str) -> str:
        """The diffusers pipeline attribute that holds canonical `component` (where a family
        stores it under another name, e.g. Chroma's T5 in text_encoder)."""
        return component

    def missing_hint(self, module: str) -> str | None:
        """Why this model may lack `module` (said when a source module has no counterpart here)."""
        return None

    # ------------------------------------------------------------------ tensors
    def _file(self, path: Path) -> "SafetensorsFile | TensorSource":
        held = self.resident.get(path)
        if held is not None:
            return held
        with self._lock:  # loads may come from a prefetch thread
            h = self._handles.get(path)
            if h is None:  # safetensors, GGUF or scaled safetensors, by the file (tensor_files)
                from ..tensor_files import open_file

                h = self._handles[path] = open_file(path)
            return h

    def load(self, module: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The weight of `module` (row slice / transpose applied), read lazily, as `dtype`
        (None: as stored)."""
        ref = self.weights.get(module)
        if ref is None:
            raise ModelError(f"{self.path}: no weight '{module}' in this model")
        f = self._file(ref.file)
        if ref.pieces:
            t = torch.cat([f.get_rows(ref.key, a, b) for a, b in ref.pieces])
        else:
            t = f.get_rows(ref.key, *ref.rows) if ref.rows else f.get(ref.key)
        if ref.transposed:
            t = t.t()
        return (t if dtype is None else t.to(dtype)).contiguous()

    # ------------------------------------------------------------------ identity
    def identity(self) -> str:
        """Content fingerprint (sha256 hex) of the canonical weights: every module id, shape and
        stored dtype, plus a few sampled elements of each weight (`sample_runs`).

        It depends on what the weights are, not on where or how they are stored: the same weights
        in a diffusers folder, a single file or a module held in memory (checkpoints.memory) get
        the same identity, so they share basis-cache entries. Reads a few hundred KiB even for
        multi-GB models (for weights on a GPU: a few elements of each copied to the host).
        """
        if self._identity is None:
            h = hashlib.sha256(_ID_VERSION)
            for module in sorted(self.weights):
                ref = self.weights[module]
                h.update(f"{module}\0{'x'.join(map(str, ref.shape))}\0{ref.dtype}\0".encode())
                h.update(read_runs(self._file(ref.file), ref.key, sample_runs(ref)))
            self._identity = h.hexdigest()
        return self._identity

    # ------------------------------------------------------------------ description
    # a family whose weights are all linears (the transformer families) counts no convs
    LINEAR_ONLY: ClassVar[bool] = False

    def describe(self) -> dict:
        """Facts for `prolora inspect`: family (and variant, where the model has one), layout,
        files, per-component counts, dtypes, and last the reader's structure facts (`facts`, where
        the model has them); each family's model may add its own."""
        comps: dict[str, dict] = {}
        zero = {"weights": 0, "linear": 0, "parameters": 0} if self.LINEAR_ONLY else \
            {"weights": 0, "linear": 0, "conv": 0, "parameters": 0}
        for ref in self.weights.values():
            c = comps.setdefault(ref.module.partition(".")[0], dict(zero))
            c["weights"] += 1
            c["conv" if len(ref.shape) == 4 and not self.LINEAR_ONLY else "linear"] += 1
            c["parameters"] += ref.numel
        for comp, facts in self.text_encoders.items():
            comps.setdefault(comp, {}).update(facts)
        variant = getattr(self, "variant", None)
        return {
            "name": self.name,
            "path": str(self.path),
            "family": self.family,
            **({"variant": variant} if variant is not None else {}),
            "layout": self.layout,
            "files": [{"role": role, "path": str(p), "bytes": p.stat().st_size} for role, p in sorted(self.files.items())],
            "components": comps,
            "dtypes": dict(Counter(r.dtype for r in self.weights.values())),
            **getattr(self, "facts", {}),
        }

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        with self._lock:
            for h in self._handles.values():
                h.close()
            self._handles.clear()

    def __enter__(self) -> "BaseModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BaseModel({self.name!r}, family={self.family}, layout={self.layout}, weights={len(self.weights)})"


class TensorSource(Protocol):
    """What BaseModel reads tensors through besides SafetensorsFile: whole tensors, row ranges,
    and element runs by flat index for the identity. checkpoints.memory.ModuleTensors (a model's
    own parameters) is the one implementation."""

    def get(self, name: str) -> torch.Tensor: ...

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...

    def runs(self, name: str, runs: list[tuple[int, int]]) -> bytes:
        """The stored bytes of elements [i, i + n) of the flattened tensor, for each (i, n)."""
        ...

    def close(self) -> None: ...


def sample_runs(ref: WeightRef) -> list[tuple[int, int]]:
    """The identity's sample of one weight: (flat element index in the STORED tensor, count) for
    _ID_RUNS evenly spaced positions of the weight as the model sees it (row slice, pieces and
    transpose applied), each a run inside one row. Defined on the weight itself, so a weight cut
    from a fused tensor (BFL qkv) and the same weight stored alone (diffusers to_q) agree."""
    rows = ref.shape[0]
    cols = math.prod(ref.shape[1:])
    total = rows * cols
    out = []
    for j in range(min(_ID_RUNS, total)):
        f = (j * total) // _ID_RUNS + total // (2 * _ID_RUNS)
        r, c = divmod(f, cols)
        n = min(_ID_RUN_ELEMENTS, cols - c)
        if ref.transposed:  # stored [in, out]: a weight row is a stored column, one element at a time
            out += [((c + i) * rows + r, 1) for i in range(n)]
            continue
        stored_row = r
        if ref.pieces:
            for a, b in ref.pieces:
                if stored_row < b - a:
                    stored_row += a
                    break
                stored_row -= b - a
        elif ref.rows:
            stored_row += ref.rows[0]
        out.append((stored_row * cols + c, n))
    return out


def read_runs(src: "SafetensorsFile | TensorSource", key: str, runs: list[tuple[int, int]]) -> bytes:
    """The bytes of `runs` (see sample_runs) of tensor `key` in a file (pread) or a TensorSource."""
    if not isinstance(src, SafetensorsFile):  # in memory, GGUF, scaled: the dequantized elements
        return src.runs(key, runs)
    info = src.info(key)
    size = ITEMSIZE[info.dtype]
    return b"".join(bytes(src._read(key, info.start + i * size, n * size).numpy()) for i, n in runs)
