"""Header validation, lazy reads and the atomic streaming writer."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from prolora.errors import CorruptFileError, InputFileError, PickleRefusedError
from prolora.safetensors_io import SafetensorsFile, StreamingWriter, load_all, read_header, save


def raw_file(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


def test_round_trip_with_the_safetensors_library(tmp_path):
    t = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.tensor(2.5), "c": torch.arange(6, dtype=torch.int64)}
    save(tmp_path / "x.safetensors", t, {"k": "v"})
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], t[k]) for k in t)
    save_file(t, tmp_path / "y.safetensors", {"k": "v"})
    tensors, meta = load_all(tmp_path / "y.safetensors")
    assert meta == {"k": "v"} and all(torch.equal(tensors[k], t[k]) for k in t)


def test_row_slices_read_lazily(tmp_path):
    w = torch.randn(12, 4)
    save(tmp_path / "w.safetensors", {"w": w})
    with SafetensorsFile(tmp_path / "w.safetensors") as f:
        assert torch.equal(f.get_rows("w", 4, 8), w[4:8])
        with pytest.raises(InputFileError):
            f.get_rows("w", 8, 13)
        with pytest.raises(InputFileError, match="no tensor named 'nope'"):
            f.get("nope")


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header,data,length,message", [
    ({"w": ENTRY}, b"\0" * 4, None, "truncated"),
    ({"w": ENTRY}, b"\0" * 8, 10**6, "runs past the end"),
    ({"w": ENTRY}, b"\0" * 8, 10**12, "exceeds"),
    (b"{not json", b"", None, "not JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    ({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "invalid shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "invalid data_offsets"),
    ({"a": ENTRY, "b": ENTRY}, b"\0" * 8, None, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16, None, "hole"),
    ({"w": ENTRY}, b"\0" * 12, None, "cover"),
    ({"__metadata__": {"a": 1}, "w": ENTRY}, b"\0" * 8, None, "__metadata__"),
])
def test_corrupt_headers_give_one_line_errors(tmp_path, header, data, length, message):
    p = raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CorruptFileError, match=message) as e:
        read_header(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_short_and_missing_files(tmp_path):
    (tmp_path / "s.safetensors").write_bytes(b"\1\2")
    with pytest.raises(CorruptFileError, match="too short"):
        read_header(tmp_path / "s.safetensors")
    with pytest.raises(InputFileError, match="no such file"):
        read_header(tmp_path / "missing.safetensors")
    with pytest.raises(InputFileError, match="directory"):
        read_header(tmp_path)


@pytest.mark.parametrize("name,content", [("m.ckpt", b"anything"), ("m.safetensors", b"PK\x03\x04zip"),
                                          ("m.safetensors", b"\x80\x02pickle")])
def test_pickles_are_refused_unread(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(PickleRefusedError, match="never unpickles"):
        read_header(tmp_path / name)


def test_streaming_writer_is_atomic(tmp_path):
    out = tmp_path / "o.safetensors"
    entries = [("a", torch.float32, (2, 2)), ("b", torch.float16, (3,))]
    with pytest.raises(RuntimeError):
        with StreamingWriter(out, entries) as w:
            w.write("a", torch.ones(2, 2))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="only 1 of 2"):
        with StreamingWriter(out, entries) as w:
            w.write("a", torch.ones(2, 2))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="declared"):
        with StreamingWriter(out, entries) as w:
            w.write("b", torch.ones(3, dtype=torch.float16))
    assert list(tmp_path.iterdir()) == []
    with StreamingWriter(out, entries, {"m": "1"}) as w:
        w.write("a", torch.ones(2, 2))
        w.write("b", torch.arange(3, dtype=torch.float16))
    assert [p.name for p in tmp_path.iterdir()] == ["o.safetensors"]
    assert torch.equal(load_file(out)["b"], torch.arange(3, dtype=torch.float16))
    assert (out.stat().st_mode & 0o777) != 0o600  # umask permissions, not mkstemp's


def test_writer_leaves_nothing_when_the_disk_is_full(tmp_path, monkeypatch):
    import os

    real_fsync = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        save(tmp_path / "o.safetensors", {"a": torch.ones(4)})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []
