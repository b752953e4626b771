"""Finished output factors parked on disk until their LoRA is complete.

A LoRA of a batch is complete only when its last layer is done, which for LoRAs on every layer
is the end of the pass; held in memory, each one's float32 factors (twice its file size at
float16) would grow the batch's resident memory with every LoRA. Parked in an unlinked
temporary file they cost page cache, not resident memory, and vanish with the process however
it ends.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Parked:
    """Where one tensor lies in a Spill, and its shape and dtype."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class Spill:
    """An append-only store of tensors in an unlinked temporary file (created on first use)."""

    def __init__(self, folder: str | None = None):
        self._folder = folder
        self._file = None
        self._end = 0

    def put(self, t: torch.Tensor) -> Parked:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._folder, prefix="prolora-spill-")
        data = t.detach().cpu().contiguous()
        view = memoryview(data.view(torch.uint8).reshape(-1).numpy())
        written = os.pwrite(self._file.fileno(), view, self._end)
        while written < len(view):  # pwrite may write less than asked
            written += os.pwrite(self._file.fileno(), view[written:], self._end + written)
        p = Parked(self._end, tuple(data.shape), data.dtype)
        self._end += len(view)
        return p

    def get(self, p: Parked) -> torch.Tensor:
        out = torch.empty(p.shape, dtype=p.dtype)
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        got = 0
        while got < len(view):
            n = os.preadv(self._file.fileno(), [view[got:]], p.offset + got)
            if n == 0:
                raise EOFError("spill file ended early")
            got += n
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
