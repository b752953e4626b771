"""On-disk cache of bases (U_k, S, V_k) per base model and layer.

Entries are safetensors files under <root>/bases/<model id>/<module>.<precision>.safetensors,
keyed by the model's content identity (not its path). An entry holds the whole spectrum, so a
k chosen from it (energy mode) is known without the weight, and the vectors stored as rows
(U^T, V^T) so that a smaller k reads only the first rows. The largest k asked for is kept.
Writes go to a temporary file renamed into place: readers only ever see complete entries, and
two processes building the same entry leave one complete result.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptFileError, InputFileError
from .ops.svd import Basis, KSpec, resolve_k
from .safetensors_io import SafetensorsFile, atomic_path, save

FORMAT_VERSION = "1"
STALE_TMP_SECONDS = 24 * 3600


def default_root() -> Path:
    env = os.environ.get("PROLORA_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prolora"


def _precision(dtype: torch.dtype) -> str:
    return {torch.float64: "f64", torch.float32: "f32"}[dtype]


@dataclass
class ModelEntry:
    model_id: str
    name: str
    family: str
    layers: int
    bytes: int
    path: Path


@dataclass
class Entry:
    """A cache entry found by BasisCache.locate: its open file, the k asked (resolved), the
    spectrum and ||W||_F^2. Ut and Vt hold the vectors as rows: the first k rows are the basis."""

    file: SafetensorsFile
    k: int
    S: torch.Tensor
    energy: float

    def rows(self, name: str) -> torch.Tensor:
        """The first k rows of "Ut" or "Vt" (k x m or k x n)."""
        return self.file.get_rows(name, 0, self.k)


class BasisCache:
    """Bases of base-model layers on disk, shared by runs and processes."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.hits = 0
        self.misses = 0
        self.write_errors = 0

    def _dir(self, model_id: str) -> Path:
        return self.root / "bases" / model_id[:32]

    def _file(self, model_id: str, module: str, dtype: torch.dtype) -> Path:
        return self._dir(model_id) / f"{module}.{_precision(dtype)}.safetensors"

    def register(self, model_id: str, name: str, family: str) -> None:
        """Record which model an id belongs to, for `prolora cache ls`."""
        d = self._dir(model_id)
        info = d / "model.json"
        if info.exists():
            return
        try:
            d.mkdir(parents=True, exist_ok=True)
            with atomic_path(info) as tmp:
                tmp.write_text(json.dumps({"id": model_id, "name": name, "family": family}))
        except OSError as e:  # a read-only or full cache folder: run without caching
            self._write_failed(e)

    def locate(self, model_id: str, module: str, shape: tuple[int, int], k: KSpec,
               dtype: torch.dtype) -> "Entry | None":
        """The open entry of a module if it is complete and holds at least the k asked (its
        spectrum read, its vectors not yet), else None; counts the hit or miss. The caller
        reads the vectors (`Entry.rows`, or straight into its own buffers) and closes it."""
        path = self._file(model_id, module, dtype)
        f = None
        try:
            f = SafetensorsFile(path)
            md = f.metadata
            if md.get("version") != FORMAT_VERSION or md.get("shape") != f"{shape[0]}x{shape[1]}":
                raise ValueError("another version or shape")
            S = f.get("S")
            energy = float(md["energy"])
            kk = resolve_k(k, S, energy)
            if kk > int(md["k"]):
                raise ValueError("too few vectors")
            for name in ("Ut", "Vt"):
                f.info(name)
        except (InputFileError, CorruptFileError, KeyError, ValueError):
            if f is not None:
                f.close()
            self.misses += 1
            return None
        self.hits += 1
        return Entry(f, kk, S, energy)

    def get(self, model_id: str, module: str, shape: tuple[int, int], k: KSpec,
            dtype: torch.dtype) -> Basis | None:
        """The basis if a complete entry with enough vectors exists, else None."""
        entry = self.locate(model_id, module, shape, k, dtype)
        if entry is None:
            return None
        try:
            with entry.file:
                U, V = entry.rows("Ut").T, entry.rows("Vt").T
        except (InputFileError, CorruptFileError):
            self.hits -= 1
            self.misses += 1
            return None
        return Basis(U, entry.S, V, entry.energy)

    def stored_k(self, model_id: str, module: str, dtype: torch.dtype) -> int:
        """How many vectors the entry holds (0: none)."""
        path = self._file(model_id, module, dtype)
        try:
            with SafetensorsFile(path) as f:
                return int(f.metadata.get("k", 0))
        except (InputFileError, CorruptFileError, ValueError):
            return 0

    def put(self, model_id: str, module: str, basis: Basis, shape: tuple[int, int], backend: str) -> None:
        """Store `basis` unless an entry with at least as many vectors is already there."""
        dtype = basis.U.dtype
        if self.stored_k(model_id, module, dtype) >= basis.k:
            return
        path = self._file(model_id, module, dtype)
        tensors = {"S": basis.S.to("cpu", dtype).contiguous(), "Ut": basis.U.T.to("cpu").contiguous(),
                   "Vt": basis.V.T.to("cpu").contiguous()}
        meta = {"version": FORMAT_VERSION, "module": module, "shape": f"{shape[0]}x{shape[1]}",
                "k": str(basis.k), "energy": repr(basis.energy), "backend": backend}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save(path, tensors, meta)
        except OSError as e:  # a full disk or a removed folder costs the cache entry, not the run
            self._write_failed(e)

    def _write_failed(self, e: OSError) -> None:
        self.write_errors += 1
        if self.write_errors == 1:
            warnings.warn(f"basis cache {self.root}: cannot write ({e.strerror or e}); "
                          "continuing without caching", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ management
    def models(self) -> list[ModelEntry]:
        out = []
        base = self.root / "bases"
        if not base.is_dir():
            return out
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            try:
                info = json.loads((d / "model.json").read_text())
            except (OSError, ValueError):
                info = {"id": d.name, "name": "?", "family": "?"}
            files = [p for p in d.iterdir() if p.name.endswith(".safetensors") and not p.name.startswith(".")]
            out.append(ModelEntry(info.get("id", d.name), info.get("name", "?"), info.get("family", "?"),
                                  len(files), sum(p.stat().st_size for p in files), d))
        return out

    def remove(self, selector: str | None = None) -> int:
        """Delete the entries of models whose id starts with, or whose name equals, `selector`
        (all models when None); returns the number of models removed."""
        gone = 0
        for m in self.models():
            if selector is None or m.model_id.startswith(selector) or m.name == selector:
                shutil.rmtree(m.path, ignore_errors=True)
                gone += 1
        return gone

    def clean_stale(self) -> int:
        """Remove temporary files left by killed writers (older than a day)."""
        n = 0
        base = self.root / "bases"
        if not base.is_dir():
            return 0
        now = time.time()
        for p in base.glob("*/.*.tmp"):
            try:
                if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                    p.unlink()
                    n += 1
            except OSError:
                pass
        return n
