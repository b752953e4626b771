"""The fuzzing suite's contract and mutations, shared by tests/formats/test_fuzz.py (safetensors,
LoRA and base-model readers) and tests/formats/test_fuzz_adapters.py (LyCORIS / DoRA and GGUF): any
input parses or raises a one-line ProloraError, under an alarm; derandomized hypothesis settings;
header edits and byte mutations of valid safetensors files."""
from __future__ import annotations

import json
import os
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from prolora.errors import ProloraError
from prolora.formats import read_lora
from prolora.safetensors_io import SafetensorsFile, read_header

EXAMPLES = int(os.environ.get("PROLORA_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
SECONDS_PER_EXAMPLE = 10


class Hang(Exception):
    """An example ran past SECONDS_PER_EXAMPLE."""


@contextmanager
def time_limit(seconds: float = SECONDS_PER_EXAMPLE):
    def alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def parse_or_refuse(path: Path, *, lora: bool = True) -> str:
    """Read `path` every way a run would: 'ok', or 'refused: <ProloraError subclass>'. Anything
    else (another exception, a hang) fails the test."""
    with time_limit():
        try:
            header = read_header(path)
            with SafetensorsFile(path) as f:
                for name in f.keys():
                    t = f.get(name)
                    assert tuple(t.shape) == header.tensors[name].shape
                    if t.dim() and t.shape[0]:
                        f.get_rows(name, 0, 1)
            if lora:
                read_lora(path)
        except ProloraError as e:
            assert "\n" not in str(e) and str(e)
            return f"refused: {type(e).__name__}"
    return "ok"




def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: object, data: bytes, length_delta: int = 0) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", max(len(h) + length_delta, 0)) + h + data


# ----------------------------------------------------------------------------- strategies

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["F16", "F32", "BF16", "F8_E4M3", "I64", "BOOL", "F12", "", "__metadata__"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
FIELDS = ["dtype", "shape", "data_offsets", "<entry>", "<name>", "<metadata>", "<extra key>", "<drop>"]


@st.composite
def header_edit(draw, raw: bytes) -> bytes:
    """A valid file whose JSON header has one or a few fields replaced, re-serialized (with the
    header length correct, or sometimes off)."""
    header, data = split(raw)
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(FIELDS))
        name = draw(st.sampled_from(names)) if names else None
        value = draw(JSON_VALUES)
        if what in ("dtype", "shape", "data_offsets") and name in header and isinstance(header[name], dict):
            if what == "shape" and draw(st.booleans()):  # plausible shapes: small, zero or huge dims
                value = draw(st.lists(st.sampled_from([0, 1, 2, 3, 8, 2**31, 2**62, 2**63, -1]), max_size=4))
            elif what == "data_offsets" and draw(st.booleans()):
                value = [draw(st.integers(-2, len(data) + 2)), draw(st.integers(-2, len(data) + 2))]
            header[name][what] = value
        elif what == "<entry>" and name in header:
            header[name] = value
        elif what == "<name>" and name in header:
            header[draw(st.text(max_size=40))] = header.pop(name)
        elif what == "<metadata>":
            if draw(st.booleans()):
                md = {"lora_adapter_metadata": json.dumps(draw(st.dictionaries(
                    st.sampled_from(["unet.r", "unet.lora_alpha", "unet.rank_pattern", "unet.alpha_pattern",
                                     "r", "lora_alpha", "text_encoder.r", "unet.use_rslora"]),
                    JSON_VALUES | st.dictionaries(st.sampled_from(["proj_in", "^proj_in", "attn1.to_q", "[", ".*"]),
                                                  JSON_VALUES, max_size=2), max_size=4)))}
                prev = header.get("__metadata__")
                header["__metadata__"] = {**(prev if isinstance(prev, dict) else {}), **md}
            else:
                header["__metadata__"] = value
        elif what == "<extra key>":
            header[draw(st.text(max_size=30))] = value
        elif what == "<drop>" and name in header:
            del header[name]
    delta = draw(st.sampled_from([0, 0, 0, -1, 1, -8, 100]))
    return join(header, data, delta)


@st.composite
def byte_mutation(draw, raw: bytes) -> bytes:
    """Flipped bytes (mostly in the length and header), truncation, or inserted/deleted bytes."""
    b = bytearray(raw)
    (n,) = struct.unpack("<Q", raw[:8])
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "delete", "length"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, 8 + n - 1) if draw(st.integers(0, 3)) else st.integers(0, len(b) - 1))
            b[pos] = draw(st.integers(0, 255))
    elif kind == "truncate":
        del b[draw(st.integers(0, len(b) - 1)):]
    elif kind == "insert":
        pos = draw(st.integers(0, len(b)))
        b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "delete":
        pos = draw(st.integers(0, len(b) - 1))
        del b[pos:pos + draw(st.integers(1, 16))]
    else:
        b[:8] = struct.pack("<Q", draw(st.sampled_from([0, 1, n - 1, n + 1, len(b), 2**63, 2**64 - 1,
                                                        100_000_001, draw(st.integers(0, 2**64 - 1))])))
    return bytes(b)


def write(tmp_path: Path, data: bytes, name: str = "f.safetensors") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


