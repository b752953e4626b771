"""safetensors reading with our own bounded header validation, lazy tensor access, and an atomic
header-first streaming writer.

The header is parsed and checked here before anything trusts it, so a hostile or truncated file
gets a one-line error naming the file and key instead of a crash deep inside a reader. Tensor data
is then served lazily through safetensors' mmap (whole tensors or row slices).
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from .errors import CorruptFileError, InputFileError, PickleRefusedError

# The safetensors library refuses headers above 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int  # absolute file offset of the data section
    header_bytes: bytes  # the raw JSON header, for content fingerprints


def refuse_pickle(path: Path) -> None:
    """Raise for pickled checkpoints, recognised by suffix or by magic bytes; never unpickle."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise PickleRefusedError(
            f"{path}: '{suffix}' files are pickled PyTorch checkpoints, which can run arbitrary code "
            "when loaded; prolora never unpickles. Convert it to .safetensors with a tool you trust."
        )
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return
    if len(head) == 9 and head[8:9] == b"{":
        return  # a safetensors header (whose 8-byte length may well start with 0x80 or "PK")
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise PickleRefusedError(
            f"{path}: this is a pickled/zip PyTorch checkpoint, not safetensors; prolora never "
            "unpickles. Convert it to .safetensors with a tool you trust."
        )


def _corrupt(path: Path, what: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: not a valid safetensors file: {what}")


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate a safetensors header without reading tensor data."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory, expected a .safetensors file")
    refuse_pickle(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"file is {size} bytes, too short for a header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise _corrupt(path, f"header length {n} runs past the end of the {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise InputFileError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not JSON ({e.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise _corrupt(path, "header is not a JSON object")

    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(path, "__metadata__ must map strings to strings")

    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        if not isinstance(entry, dict):
            raise _corrupt(path, f"entry for key '{name}' is not an object")
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:  # a list or an object is unhashable
            raise _corrupt(path, f"key '{name}' has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _corrupt(path, f"key '{name}' has an invalid shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise _corrupt(path, f"key '{name}' has invalid data_offsets {offs!r}")
        if offs[1] > data_len:
            raise _corrupt(
                path, f"key '{name}' data ends at byte {offs[1]} but the data section has {data_len} "
                "bytes (truncated file?)"
            )
        want = math.prod(shape) * ITEMSIZE[dtype]
        if offs[1] - offs[0] != want:
            raise _corrupt(
                path, f"key '{name}' has {offs[1] - offs[0]} bytes but {dtype}{shape} needs {want}"
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), offs[0], offs[1])

    pos = 0
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start < pos:
            raise _corrupt(path, f"key '{info.name}' overlaps the data of another tensor")
        if info.start > pos:
            raise _corrupt(path, f"hole in the data section before key '{info.name}'")
        pos = info.end
    if pos != data_len:
        raise _corrupt(path, f"data section has {data_len} bytes but the tensors cover {pos}")
    return Header(path, dict(metadata), tensors, 8 + n, raw)


def read_bytes(fd: int, path: Path, name: str, offset: int, nbytes: int, corrupt) -> torch.Tensor:
    """`nbytes` bytes at absolute `offset` of an open file, by pread into a fresh uint8 tensor;
    a short file raises corrupt(what) (the caller's one-line error for its format)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    pread_into(fd, path, name, offset, buf, corrupt)
    return buf


def pread_into(fd: int, path: Path, name: str, offset: int, buf: torch.Tensor, corrupt) -> None:
    """Fill the contiguous uint8 host tensor `buf` from absolute `offset` of an open file."""
    nbytes = buf.numel()
    view = memoryview(buf.numpy()) if nbytes else memoryview(b"")
    done = 0
    while done < nbytes:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise InputFileError(f"{path}: cannot read '{name}': {e.strerror or e}") from None
        if n == 0:
            raise corrupt(f"file ends inside the data of key '{name}' (truncated?)")
        done += n


class TensorFile:
    """What every validated tensor file shares (safetensors here, GGUF in gguf_io): its header,
    one read-only descriptor (closed by close(), the context manager or the collector), the
    metadata and the tensors' names and places."""

    def __init__(self, header):
        self.header = header
        self.path = header.path
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise InputFileError(f"{self.path}: cannot open: {e.strerror or e}") from None

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.header.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.header.tensors[name]
        except KeyError:
            raise InputFileError(f"{self.path}: no tensor named '{name}'") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsFile(TensorFile):
    """A validated safetensors file whose tensors are read on demand (whole or by row range).

    Reads use pread into fresh buffers, not mmap: the bytes read become the tensor, the file's
    pages never count against the process, and threads can read concurrently.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(read_header(path))

    def _read(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self._pread(name, offset, buf)
        return buf

    def read_into(self, name: str, offset: int, out: torch.Tensor) -> None:
        """Bytes offset.. of tensor `name`'s data into `out`, a contiguous uint8 host tensor
        (e.g. a pinned buffer: the one copy between the file and the device)."""
        info = self.info(name)
        if offset < 0 or offset + out.numel() > info.nbytes:
            raise InputFileError(f"{self.path}: bytes {offset}..{offset + out.numel()} out of range for '{name}'")
        self._pread(name, info.start + offset, out)

    def _pread(self, name: str, offset: int, buf: torch.Tensor) -> None:
        if self._fd is None:
            raise InputFileError(f"{self.path}: file already closed")
        pread_into(self._fd, self.path, name, self.header.data_start + offset, buf,
                   lambda what: _corrupt(self.path, what))

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, in its stored dtype."""
        info = self.info(name)
        return self._read(name, info.start, info.nbytes).view(DTYPES[info.dtype]).reshape(info.shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the tensor's first dimension, reading only those bytes."""
        info = self.info(name)
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise InputFileError(f"{self.path}: rows {start}:{stop} out of range for '{name}' {info.shape}")
        row = math.prod(info.shape[1:]) * ITEMSIZE[info.dtype]
        buf = self._read(name, info.start + start * row, (stop - start) * row)
        return buf.view(DTYPES[info.dtype]).reshape(stop - start, *info.shape[1:])

def load_all(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a (small) file, plus its metadata."""
    f = SafetensorsFile(path)
    try:
        return {k: f.get(k) for k in f.keys()}, f.metadata
    finally:
        f.close()


# ----------------------------------------------------------------------------------- writing


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary file is removed, so an
    interrupted or failed write never leaves a half-written output behind.
    """
    fd, tmp_path = _mkstemp_beside(Path(path))
    os.close(fd)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        try:
            tmp_path.unlink()
        except FileNotFoundError:
            pass
        raise


def _mkstemp_beside(path: Path) -> tuple[int, Path]:
    """A temporary file in the same folder (so os.replace is atomic), with umask permissions."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, Path(tmp)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def build_header(entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> bytes:
    """The JSON header (padded to 8 bytes) for tensors written in the given order."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, dtype, shape in entries:
        if name in obj:
            raise ValueError(f"duplicate tensor name '{name}'")
        code = DTYPE_NAMES[dtype]
        n = math.prod(shape) * ITEMSIZE[code]
        obj[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


class StreamingWriter:
    """Write a safetensors file tensor by tensor, header first, without holding all tensors.

    Declare every (name, dtype, shape) up front, then `write` the tensors in that order. The file
    appears at `path` atomically when the `with` block ends after the last tensor; on error or
    interrupt (or a full disk) the temporary file is removed and nothing is left behind.
    """

    def __init__(self, path: str | os.PathLike, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.entries = [(n, d, tuple(int(x) for x in s)) for n, d, s in entries]
        self.metadata = metadata
        self._next = 0

    def __enter__(self) -> "StreamingWriter":
        header = build_header(self.entries, self.metadata)
        fd, self._tmp = _mkstemp_beside(self.path)
        self._f = os.fdopen(fd, "wb")
        try:
            self._f.write(struct.pack("<Q", len(header)))
            self._f.write(header)
        except BaseException:
            self._abort()
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.entries):
            raise ValueError(f"unexpected tensor '{name}': all declared tensors already written")
        want_name, dtype, shape = self.entries[self._next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor #{self._next} is '{name}' {tensor.dtype}{tuple(tensor.shape)}, declared "
                f"'{want_name}' {dtype}{shape}"
            )
        self._f.write(_tensor_bytes(tensor))
        self._next += 1

    def _abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
        self._tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            if self._next != len(self.entries):
                raise ValueError(f"only {self._next} of {len(self.entries)} declared tensors were written")
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self._abort()
            raise


def save(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a dict of tensors atomically (insertion order kept)."""
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with StreamingWriter(path, entries, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
