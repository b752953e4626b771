"""GGUF base models (llama.cpp's container, as ComfyUI-GGUF users keep Flux, Qwen-Image, Wan and
SDXL): our own header parser, every byte checked like safetensors_io's, then tensors read by
offset with pread and dequantized per tensor (in row blocks) by the `gguf` package.

The header becomes the same `Header` / `TensorInfo` a safetensors file gives, so every family's
key maps apply unchanged: tensor names as stored (original names, with or without ComfyUI's
`model.diffusion_model.`), shapes in torch order (GGUF lists dimensions fastest first), `dtype`
the quantization's name (`Q8_0`, `F16`, ...). `GgufFile.get` returns F32/F16/BF16 tensors as
stored and every quantized one dequantized to float32.

Layout: magic `GGUF`, version (2 or 3), tensor count and key/value count (u64); the key/values
(a u64-length string, a u32 type, the value; arrays nest); per tensor its name, dimension count
(u32, at most 4), dimensions (u64 each), ggml type (u32) and offset (u64, aligned, relative to the
data section); the data section starts at the next multiple of `general.alignment` (default 32).
"""
from __future__ import annotations

import math
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CorruptFileError, InputFileError, UnsupportedFormatError
from .safetensors_io import MAX_HEADER_BYTES, Header, TensorFile, TensorInfo, read_bytes

MAGIC = b"GGUF"
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 8
MAX_STRING = 1 << 20
MAX_ELEMENTS = 1 << 40
# ggml type id -> (name, elements per block, bytes per block, nominal bits per weight)
TYPES = {0: ("F32", 1, 4, 32), 1: ("F16", 1, 2, 16), 30: ("BF16", 1, 2, 16), 8: ("Q8_0", 32, 34, 8),
         14: ("Q6_K", 256, 210, 6), 13: ("Q5_K", 256, 176, 5), 6: ("Q5_0", 32, 22, 5), 7: ("Q5_1", 32, 24, 5),
         12: ("Q4_K", 256, 144, 4), 2: ("Q4_0", 32, 18, 4), 3: ("Q4_1", 32, 20, 4)}
BITS = {name: bits for name, _, _, bits in TYPES.values()}
_BY_NAME = {v[0]: k for k, v in TYPES.items()}
# KV value types: id -> struct format of a scalar (8: string, 9: array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
ORIG_SHAPE = "comfy.gguf.orig_shape."  # ComfyUI-GGUF's record of a tensor's real shape


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _corrupt(path: Path, what: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: not a valid GGUF file: {what}")


class _Cursor:
    """Reads the header by pread, never past the end of the file nor past MAX_HEADER_BYTES."""

    def __init__(self, fd: int, path: Path, size: int):
        self.fd, self.path, self.size, self.pos = fd, path, size, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise _corrupt(self.path, f"{what} runs past the end of the {self.size}-byte file (truncated?)")
        if self.pos + n > MAX_HEADER_BYTES:
            raise _corrupt(self.path, f"the header exceeds the {MAX_HEADER_BYTES}-byte limit")
        data = os.pread(self.fd, n, self.pos) if n else b""
        if len(data) != n:
            raise _corrupt(self.path, f"{what}: the file ended early (truncated?)")
        self.pos += n
        return data

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > MAX_STRING:
            raise _corrupt(self.path, f"{what} claims a {n}-byte string")
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise _corrupt(self.path, f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        """A KV value: scalars and strings returned, arrays returned as lists when they hold
        integers (shapes) or skipped (None) otherwise, every element bounds-checked."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise _corrupt(self.path, f"{what} has unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            raise _corrupt(self.path, f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        etype, count = self.unpack("<I", what), self.unpack("<Q", what)
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype])
            if count * size > self.size - self.pos:
                raise _corrupt(self.path, f"{what} claims {count} elements, more than the file holds")
            raw = self.take(count * size, what)
            if etype in (0, 1, 2, 3, 4, 5, 10, 11) and count <= MAX_DIMS * 2:
                return list(struct.unpack(f"<{count}{_SCALARS[etype][1]}", raw))
            return None
        if count * 8 > self.size - self.pos:  # every string or array element takes at least 8 bytes
            raise _corrupt(self.path, f"{what} claims {count} elements, more than the file holds")
        for _ in range(count):
            self.value(etype, what, depth + 1)
        return None


@dataclass(frozen=True)
class GgufHeader(Header):
    """A GGUF header in safetensors_io's shape, plus each tensor's ggml type and the file size."""

    types: dict[str, int] = None  # type: ignore[assignment]
    version: int = 3


def read_header(path: str | os.PathLike) -> GgufHeader:
    """Parse and validate a GGUF header without reading tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise InputFileError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return _parse(_Cursor(fd, path, size), path, size)
    finally:
        os.close(fd)


def _parse(c: _Cursor, path: Path, size: int) -> GgufHeader:
    if c.take(4, "the magic") != MAGIC:
        raise _corrupt(path, "no GGUF magic")
    version = c.unpack("<I", "the version")
    if version not in (2, 3):
        what = "a big-endian GGUF" if version in (0x02000000, 0x03000000) else f"GGUF version {version}"
        raise UnsupportedFormatError(f"{path}: {what}; prolora reads little-endian GGUF versions 2 and 3")
    n_tensors, n_kv = c.unpack("<Q", "the tensor count"), c.unpack("<Q", "the key/value count")
    # each tensor info takes at least 28 bytes, each key/value at least 12
    if n_tensors * 28 > size or n_kv * 12 > size:
        raise _corrupt(path, f"it claims {n_tensors} tensors and {n_kv} key/values, more than its {size} bytes hold")
    metadata: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    alignment = 32
    for i in range(n_kv):
        key = c.string(f"key/value #{i}'s key")
        vtype = c.unpack("<I", f"key '{key}'")
        value = c.value(vtype, f"key '{key}'")
        if key == "general.alignment":
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value & (value - 1) or \
                    value > 1 << 16:
                raise _corrupt(path, f"general.alignment is {value!r}; it must be a power of two up to 65536")
            alignment = value
        elif key.startswith(ORIG_SHAPE) and isinstance(value, list):
            shapes[key[len(ORIG_SHAPE):]] = value
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool) and len(str(value)) <= 4096:
            metadata[key] = str(value)
    infos = []
    for i in range(n_tensors):
        name = c.string(f"tensor #{i}'s name")
        n_dims = c.unpack("<I", f"tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _corrupt(path, f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [c.unpack("<Q", f"tensor '{name}'") for _ in range(n_dims)]
        ttype, offset = c.unpack("<I", f"tensor '{name}'"), c.unpack("<Q", f"tensor '{name}'")
        infos.append((name, dims, ttype, offset))
    data_start = -(-c.pos // alignment) * alignment
    data_len = size - data_start
    if data_len < 0:
        raise _corrupt(path, "the file ends before its data section")
    tensors: dict[str, TensorInfo] = {}
    types: dict[str, int] = {}
    for name, dims, ttype, offset in infos:
        if name in tensors:
            raise _corrupt(path, f"tensor '{name}' appears twice")
        tensors[name], types[name] = _tensor(path, name, dims, ttype, offset, alignment, data_len, shapes), ttype
    end = 0
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start < end:
            raise _corrupt(path, f"tensor '{info.name}' overlaps the data of another tensor")
        end = info.end
    return GgufHeader(path, metadata, tensors, data_start, b"", types=types, version=version)


def _tensor(path: Path, name: str, dims: list[int], ttype: int, offset: int, alignment: int, data_len: int,
            shapes: dict[str, list[int]]) -> TensorInfo:
    if ttype not in TYPES:
        try:
            from gguf import GGMLQuantizationType

            kind = GGMLQuantizationType(ttype).name
        except (ImportError, ValueError):
            kind = f"unknown ggml type {ttype}"
        raise UnsupportedFormatError(
            f"{path}: tensor '{name}' is quantized as {kind}, which prolora does not read (it reads "
            f"{', '.join(v[0] for v in TYPES.values())})")
    tname, block, bsize, _ = TYPES[ttype]
    if any(d < 1 or d > MAX_ELEMENTS for d in dims) or math.prod(dims) > MAX_ELEMENTS:
        raise _corrupt(path, f"tensor '{name}' has dimensions {dims}")
    numel = math.prod(dims)
    if dims[0] % block:
        raise _corrupt(path, f"tensor '{name}' ({tname}) has rows of {dims[0]} elements, not a multiple of its "
                       f"{block}-element blocks")
    nbytes = numel // block * bsize
    if offset % alignment:
        raise _corrupt(path, f"tensor '{name}' starts at offset {offset}, not a multiple of the alignment {alignment}")
    if offset + nbytes > data_len:
        raise _corrupt(path, f"tensor '{name}' data ends at byte {offset + nbytes} but the data section has "
                       f"{data_len} bytes (truncated file?)")
    shape = tuple(reversed(dims))
    orig = shapes.get(name)
    if orig is not None:
        if not all(isinstance(d, int) and d >= 1 for d in orig) or math.prod(orig) != numel or len(orig) > 5:
            raise _corrupt(path, f"'{ORIG_SHAPE}{name}' is {orig}, which does not fit the tensor's {numel} elements")
        if tname not in ("F32", "F16", "BF16") and orig[-1] % block:
            raise _corrupt(path, f"'{ORIG_SHAPE}{name}' {orig} splits a {tname} block across rows")
        shape = tuple(orig)
    return TensorInfo(name, tname, shape, offset, offset + nbytes)


_NATIVE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_BLOCK_ELEMENTS = 1 << 24  # dequantized a row block at a time: at most this many float32 temporaries


class GgufFile(TensorFile):
    """A validated GGUF file whose tensors are read on demand (whole or by row range) and
    dequantized by the `gguf` package; the same interface as safetensors_io.SafetensorsFile."""

    def __init__(self, path: str | os.PathLike, header: GgufHeader | None = None):
        super().__init__(header or read_header(path))

    def get(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self.get_rows(name, 0, info.shape[0]) if info.shape else self._rows(info, 0, 1).reshape(())

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the tensor's first dimension, reading only their blocks."""
        info = self.info(name)
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise InputFileError(f"{self.path}: rows {start}:{stop} out of range for '{name}' {info.shape}")
        return self._rows(info, start, stop).reshape(stop - start, *info.shape[1:])

    def _rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        if self._fd is None:
            raise InputFileError(f"{self.path}: file already closed")
        _, block, bsize, _ = TYPES[_BY_NAME[info.dtype]]
        row = math.prod(info.shape[1:]) if info.shape else 1
        row_bytes = row // block * bsize

        def raw(a: int, b: int) -> torch.Tensor:
            return read_bytes(self._fd, self.path, info.name, self.header.data_start + info.start + a * row_bytes,
                              (b - a) * row_bytes, lambda what: _corrupt(self.path, what))

        if info.dtype in _NATIVE:
            return raw(start, stop).view(_NATIVE[info.dtype]).reshape(stop - start, row)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType(_BY_NAME[info.dtype])
        if row % block:  # a 1-D quantized tensor: its blocks span "rows" (elements); dequantize it whole
            n = math.prod(info.shape)
            data = read_bytes(self._fd, self.path, info.name, self.header.data_start + info.start, n // block * bsize,
                              lambda what: _corrupt(self.path, what)).numpy()
            out = torch.from_numpy(np.array(dequantize(data, qtype), np.float32)).reshape(-1)[start:stop, None]
            if not math.isfinite(float(out.sum(dtype=torch.float64))):
                raise _corrupt(self.path, f"tensor '{info.name}' dequantizes to NaN or Inf")
            return out
        out = torch.empty(stop - start, row, dtype=torch.float32)
        step = max(1, _BLOCK_ELEMENTS // max(row, 1))
        for a in range(start, stop, step):
            b = min(stop, a + step)
            data = raw(a, b).numpy().reshape(b - a, row_bytes)
            with warnings.catch_warnings():  # NaN from damaged scales is refused just below
                warnings.simplefilter("ignore", RuntimeWarning)
                out[a - start:b - start] = torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype), np.float32))
        if not math.isfinite(float(out.sum(dtype=torch.float64))):  # garbage block scales (inf * 0)
            raise _corrupt(self.path, f"tensor '{info.name}' dequantizes to NaN or Inf")
        return out

    def runs(self, name: str, runs: list[tuple[int, int]]) -> bytes:
        """The dequantized bytes of elements [i, i + n) of the flattened tensor, each run inside
        one row (the identity's sample; checkpoints.model.sample_runs)."""
        info = self.info(name)
        row = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
        out = []
        for i, n in runs:
            r, c = divmod(i, row)
            t = self._rows(info, r, r + 1).reshape(-1)[c:c + n]
            out.append(t.to(torch.float32).numpy().tobytes())
        return b"".join(out)
