"""Header validation, lazy reads and the atomic streaming writer; damaged files and pickles given to
the command line, as a LoRA and as a base model: one line that names the file (and the tensor),
exit 2, no output; a pickle is never unpickled."""
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from faults import cli, files_in, header_and_data, one_line_error, write_raw
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


# ----------------------------------------------------------------------------- damaged files through the command line


CORRUPTIONS = ["truncated", "header_beyond_file", "absurd_header", "not_json", "overlap", "out_of_range",
               "hole", "unknown_dtype", "shape_mismatch", "dtype_mismatch", "trailing_bytes", "bad_metadata"]


def corrupt(src: Path, dst: Path, how: str, sparse: bool) -> tuple[Path, str, str | None]:
    """A damaged copy of safetensors file `src`: (path, expected message part, key it must name).
    `sparse`: write the data section as zeros without I/O (base models; only headers matter)."""
    header, data = header_and_data(src)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    data_out: bytes | int = len(data) if sparse else data
    first, (last_key, last) = entries[0], entries[-1]
    key = None
    if how == "truncated":
        size = 8 + len(json.dumps(header, separators=(",", ":"))) + len(data) // 2
        write_raw(dst, header, data_out)
        os.truncate(dst, size)
        return dst, "truncated", None  # names the first tensor past the cut
    if how == "header_beyond_file":
        n = len(json.dumps(header, separators=(",", ":")).encode())
        return write_raw(dst, header, 0, length=n + 1000), "runs past the end", None
    if how == "absurd_header":
        return write_raw(dst, header, data_out, length=2**62), "exceeds the", None
    if how == "not_json":
        raw = json.dumps(header, separators=(",", ":")).encode()
        return write_raw(dst, b"{\x00" + raw[2:], data_out), "not JSON", None
    if how == "overlap":  # the last tensor claims the bytes of the first (either may be named)
        last["data_offsets"] = [first[1]["data_offsets"][0], first[1]["data_offsets"][0] + last["data_offsets"][1]
                                - last["data_offsets"][0]]
        expect = "overlaps the data of another tensor"
    elif how == "out_of_range":
        key = last_key
        size = last["data_offsets"][1] - last["data_offsets"][0]
        last["data_offsets"] = [len(data) + 8, len(data) + 8 + size]
        expect = "data ends at byte"
    elif how == "hole":  # a tensor removed from the header: its bytes become a hole
        del header[entries[len(entries) // 2][0]]
        key = entries[len(entries) // 2 + 1][0]
        expect = "hole"
    elif how == "unknown_dtype":
        key, expect = first[0], "unknown dtype"
        first[1]["dtype"] = "F12"
    elif how == "shape_mismatch":
        key, expect = first[0], "needs"
        first[1]["shape"] = [first[1]["shape"][0] + 1, *first[1]["shape"][1:]] if first[1]["shape"] else [2]
    elif how == "dtype_mismatch":
        key, expect = first[0], "needs"
        first[1]["dtype"] = {"F16": "F32", "BF16": "F32", "F32": "F64"}[first[1]["dtype"]]
    elif how == "trailing_bytes":
        write_raw(dst, header, data + b"\0" * 16 if not sparse else len(data) + 16)
        return dst, "tensors cover", None
    elif how == "bad_metadata":
        header["__metadata__"] = {"a": 1}
        expect = "__metadata__"
    else:
        raise AssertionError(how)
    return write_raw(dst, header, data_out), expect, key


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("role", ["lora", "source"])
def test_corrupt_safetensors_one_line_error_no_output(small, tmp_path, capsys, role, how):
    src, tgt, lora = small["source"], small["target"], small["lora"]
    victim = lora if role == "lora" else src
    bad, expect, key = corrupt(Path(victim), tmp_path / f"bad {how}.safetensors", how, sparse=role != "lora")
    if role == "lora":
        lora = bad
    else:
        src = bad
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = cli(capsys, "transfer", src, tgt, lora, "-o", out / "o.safetensors", "-q", "--no-cache")
    assert code == 2
    line = one_line_error(err, str(bad), expect)
    if key is not None:
        assert f"'{key}'" in line
    assert files_in(out) == []


def test_header_size_is_bounded_before_reading(tmp_path):
    """What is read before the header is trusted is bounded: a header length past the limit is
    refused without reading it even when the file really is that long (a sparse 4 GiB file), and
    a header just under the limit costs at most about the limit in memory."""
    import tracemalloc

    from prolora.errors import CorruptFileError
    from prolora.safetensors_io import MAX_HEADER_BYTES

    def sparse(name: str, length: int, size: int) -> Path:
        p = tmp_path / name
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", length))
            f.truncate(size)  # sparse: no disk space used
        return p

    cases = [(sparse("huge.safetensors", 4 * 2**30, 4 * 2**30 + 8), "exceeds", 1 << 20),
             (sparse("big.safetensors", MAX_HEADER_BYTES, MAX_HEADER_BYTES + 8), "not JSON", 2.5 * MAX_HEADER_BYTES)]
    for path, expect, bound in cases:
        tracemalloc.start()
        try:
            with pytest.raises(CorruptFileError, match=expect):
                read_header(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < bound, (path.name, peak)


class _Payload:
    """Unpickling this creates the folder `marker`: proof of code execution at load time."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickled_files_are_refused_and_never_unpickled(small, tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(_Payload(str(marker)), protocol=2)
    # the payload is live: loading it (here, on purpose) runs code
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(str(probe)), protocol=2))
    assert probe.is_dir()

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    files = {}
    for name in ("model.ckpt", "model.pt", "model.bin", "model.pth", "lora.pt"):
        files[name] = pickles / name
        files[name].write_bytes(payload)
    torch.save({"w": _Payload(str(marker))}, pickles / "zip.safetensors")  # zip container, wrong suffix
    files["zip.safetensors"] = pickles / "zip.safetensors"
    files["raw.safetensors"] = pickles / "raw.safetensors"  # raw pickle, wrong suffix
    files["raw.safetensors"].write_bytes(payload)
    pipe = tmp_path / "pickled_pipeline"  # a diffusers folder with .bin weights only
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "unet" / "config.json").write_text("{}")
    (pipe / "unet" / "diffusion_pytorch_model.bin").write_bytes(payload)

    out = tmp_path / "out"
    out.mkdir()
    runs = [("source", p) for p in files.values()] + [("lora", p) for p in files.values()] + [("source", pipe)]
    for role, p in runs:
        src, lora = (p, small["lora"]) if role == "source" else (small["source"], p)
        code, _, err = cli(capsys, "transfer", src, small["target"], lora, "-o", out / "o.safetensors", "--no-cache")
        assert code == 2, (role, p)
        one_line_error(err, str(p if p != pipe else pipe / "unet"), "never unpickles")
    for p in files.values():
        code, _, err = cli(capsys, "inspect", p)
        assert code == 2
        one_line_error(err, str(p), "never unpickles")
    assert not marker.exists() and files_in(out) == []
