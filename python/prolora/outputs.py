"""Output paths, checked before any work: never an input, never a file of an input model, never an
existing file without `overwrite`, in a folder that exists and is writable."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .checkpoints import BaseModel
from .checkpoints.memory import LAYOUT as MEMORY_LAYOUT
from .checkpoints.memory import is_in_memory
from .errors import InputFileError, OutputPathError
from .lora import LoraFile

PathLike = str | os.PathLike


def _paths_of(x: Any) -> list[Path]:
    if isinstance(x, BaseModel):
        return [] if x.layout == MEMORY_LAYOUT else [Path(x.path)]
    if is_in_memory(x):
        return []
    if isinstance(x, LoraFile):
        return [Path(x.path)] if x.path else []
    return [Path(x)]


def check_output_path(out: Path, inputs: list[Any], *, overwrite: bool, suffix: str | None = None) -> Path:
    """Refuse an output that is (or is inside and would replace a file of) an input, that exists
    without `overwrite`, or whose folder is missing or read-only."""
    if suffix and out.suffix.lower() != suffix:
        raise OutputPathError(f"{out}: output must be a {suffix} file")
    for src in (p for x in inputs for p in _paths_of(x)):
        if out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise OutputPathError(f"{out}: output would overwrite an input; choose another path")
        if src.is_dir() and src.resolve() in out.resolve().parents and out.exists():
            raise OutputPathError(f"{out}: output would overwrite a file of input model {src}")
    if out.is_dir():
        raise OutputPathError(f"{out}: is a folder")
    if out.exists() and not overwrite:
        raise OutputPathError(f"{out}: already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise OutputPathError(f"{out.parent}: output folder does not exist")
    if not os.access(out.parent, os.W_OK):
        raise OutputPathError(f"{out.parent}: output folder is not writable")
    return out


def resolve_output(output: PathLike, lora: PathLike | LoraFile, inputs: list[Any], overwrite: bool) -> Path:
    """The LoRA output path (a folder means: the LoRA's file name inside it), validated before any work."""
    out = Path(output)
    if out.is_dir():
        name = (Path(lora.path).name if lora.path else "transferred.safetensors") if isinstance(lora, LoraFile) \
            else Path(lora).name
        out = out / name
    return check_output_path(out, inputs, overwrite=overwrite, suffix=".safetensors")


def resolve_report_path(path: PathLike, inputs: list[Any]) -> Path:
    """A report/figure path: never an input; replacing an earlier report is fine."""
    return check_output_path(Path(path), inputs, overwrite=True)


def write_checked(path: PathLike, write: Callable[[PathLike], None]) -> None:
    """write(path); an OS error (a full disk, ...) becomes a one-line error naming the file."""
    try:
        write(path)
    except OSError as e:
        raise OutputPathError(f"{path}: cannot write: {e.strerror or e}") from None



def lora_files(folder: PathLike) -> list[Path]:
    """The .safetensors files directly inside `folder`, sorted."""
    d = Path(folder)
    if not d.is_dir():
        raise InputFileError(f"{d}: not a folder")
    return sorted(p for p in d.iterdir() if p.suffix == ".safetensors" and p.is_file())
