"""Fuzzing of the parsers a downloaded file meets first: the safetensors header reader
(read_header / SafetensorsFile), the LoRA reader (read_lora) and the base-model reader
(open_model), and the command line on a handful of mutated files.

The contract: any input either parses or raises a ProloraError subclass; never another exception
type, never a hang (each example runs under an alarm), never a large allocation (files here are
small, and what is read before the header is trusted is bounded; see also
test_reliability.py::test_header_size_is_bounded_before_reading).

Hypothesis runs derandomized (the same examples on every run) with a small example budget so the
whole file takes seconds; raise PROLORA_FUZZ_EXAMPLES for a longer local session.
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fuzz_common import (EXAMPLES, FUZZ, JSON_VALUES, byte_mutation, header_edit, join, parse_or_refuse, split,
                         time_limit, write)
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from prolora.families import open_model
from prolora.cli import main
from prolora.errors import ProloraError
from prolora.formats import read_lora, write_lora
from prolora.lora import LoraFile, LoraModule
from prolora.safetensors_io import read_header

# ----------------------------------------------------------------------------- seed files


def _module(key: str, out: int, inn: int, r: int, alpha: float | None, conv: bool = False,
            dtype=torch.float16) -> LoraModule:
    g = torch.Generator().manual_seed(len(key))
    down = torch.randn((r, inn, 3, 3) if conv else (r, inn), generator=g).to(dtype)
    up = torch.randn((out, r, 1, 1) if conv else (out, r), generator=g).to(dtype)
    return LoraModule(key, down, up, alpha)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """Small valid LoRA files in each format (bytes), the starting points of the mutations."""
    d = tmp_path_factory.mktemp("fuzz_seeds")
    files = {
        "kohya": LoraFile("kohya", {m.key: m for m in [
            _module("lora_unet_input_blocks_4_1_proj_in", 8, 8, 2, 1.0),
            _module("lora_unet_input_blocks_4_0_in_layers_2", 8, 4, 2, 2.0, conv=True),
            _module("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 6, 6, 2, None)]},
            {"ss_network_dim": "2", "ss_network_alpha": "1.0"}),
        "peft": LoraFile("peft", {m.key: m for m in [
            _module("unet.down_blocks.1.attentions.0.proj_in", 8, 8, 2, 3.0, dtype=torch.float32),
            _module("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 8, 8, 4, 2.0,
                    dtype=torch.float32),
            _module("text_encoder.text_model.encoder.layers.0.mlp.fc1", 12, 6, 2, 1.0, dtype=torch.float32)]}),
        "comfy": LoraFile("comfy", {m.key: m for m in [
            _module("diffusion_model.input_blocks.4.1.proj_in", 8, 8, 2, None, dtype=torch.bfloat16)]}),
    }
    out = {}
    for name, lf in files.items():
        p = d / f"{name}.safetensors"
        write_lora(p, lf, lf.format)
        out[name] = p.read_bytes()
        assert parse_or_refuse(p) == "ok"
    return out


# ----------------------------------------------------------------------------- safetensors / LoRA


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(tmp_path, data):
    outcome = parse_or_refuse(write(tmp_path, data))
    event(outcome)
    assert outcome.startswith("refused") or data[8:9] == b"{"


@FUZZ
@given(data=st.binary(max_size=300), n=st.integers(0, 2**64 - 1))
def test_random_header_after_a_length(tmp_path, data, n):
    """A plausible start (length + '{') followed by anything."""
    raw = struct.pack("<Q", n if n < 2**20 else n % (len(data) + 2)) + b"{" + data
    event(parse_or_refuse(write(tmp_path, raw)))


@FUZZ
@given(st.data())
def test_mutated_bytes_of_valid_loras(seeds, tmp_path, data):
    raw = seeds[data.draw(st.sampled_from(sorted(seeds)))]
    event(parse_or_refuse(write(tmp_path, data.draw(byte_mutation(raw)))))


@FUZZ
@given(st.data())
def test_edited_headers_of_valid_loras(seeds, tmp_path, data):
    raw = seeds[data.draw(st.sampled_from(sorted(seeds)))]
    event(parse_or_refuse(write(tmp_path, data.draw(header_edit(raw)))))


KEY_PARTS = st.sampled_from([
    "lora_unet_input_blocks_4_1_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te2_x",
    "unet.down_blocks.1.attentions.0.proj_in", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "diffusion_model.input_blocks.4.1.proj_in", "text_encoders.clip_l.transformer.x",
    "unet.mid_block.attentions.0.processor.to_q_lora", "transformer.single_blocks.0.linear1", "", "x.y",
])
SUFFIXES = st.sampled_from([
    ".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight", ".lora_B.bias",
    ".lora.down.weight", ".lora.up.weight", ".down.weight", ".up.weight", ".lora_linear_layer.down.weight",
    ".dora_scale", ".hada_w1_a", ".lora_mid.weight", ".weight", "",
])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8,
                          torch.bool, torch.float8_e4m3fn, torch.uint8])


@st.composite
def tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    dtype = draw(DTYPES)
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) * 3
    if t.numel() and draw(st.integers(0, 4)) == 0:
        t.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 1e30]))
    return t.to(dtype)


@FUZZ
@given(items=st.dictionaries(st.tuples(KEY_PARTS, SUFFIXES), tensors(), min_size=1, max_size=6),
       metadata=st.none() | st.dictionaries(st.sampled_from(["lora_adapter_metadata", "ss_network_dim", "format"]),
                                           st.text(max_size=20) | JSON_VALUES.map(json.dumps), max_size=2))
def test_random_lora_structures(tmp_path, items, metadata):
    """Well-formed safetensors whose tensors are random LoRA-looking keys, shapes, dtypes, values."""
    t = {a + b: v for (a, b), v in items.items()}
    save_file(t, str(tmp_path / "l.safetensors"), metadata=metadata)
    event(parse_or_refuse(tmp_path / "l.safetensors"))


# ----------------------------------------------------------------------------- base models


@pytest.fixture(scope="module")
def model_header(sdxl_pair) -> dict:
    """The tiny SDXL source's header (single file), to mutate; data is written sparse."""
    h = read_header(sdxl_pair["source"])
    return {k: {"dtype": v.dtype, "shape": list(v.shape)} for k, v in h.tensors.items()}


def sparse_model(path: Path, entries: dict, itemsize={"F16": 2, "F32": 4, "BF16": 2, "F64": 8}) -> Path:
    """A single-file checkpoint with these (key -> dtype, shape) entries laid out contiguously; the
    data section is sparse zeros (only headers are read when a model is opened)."""
    header, pos = {}, 0
    for k, v in entries.items():
        n = itemsize[v["dtype"]]
        for d in v["shape"]:
            n *= d
        header[k] = {**v, "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + pos)
    return path


@st.composite
def model_mutation(draw, entries: dict) -> dict:
    entries = {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in entries.items()}
    keys = list(entries)
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(keys))
        if key not in entries:
            continue
        kind = draw(st.sampled_from(["rename", "renumber", "drop", "shape", "transpose"]))
        if kind == "rename":
            parts = key.split(".")
            i = draw(st.integers(0, len(parts) - 1))
            parts[i] = draw(st.sampled_from(["", "0", "99", "weight", "bias", "attn1", "input_blocks",
                                             "transformer_blocks", "to_q", "in_proj_weight"]))
            entries[".".join(parts)] = entries.pop(key)
        elif kind == "renumber":
            entries[key.replace("1", str(draw(st.integers(0, 12))), 1)] = entries.pop(key)
        elif kind == "drop":
            del entries[key]
        elif kind == "shape":
            shape = entries[key]["shape"]
            entries[key]["shape"] = draw(st.lists(st.sampled_from([0, 1, 3, 4, 64]), max_size=4)) \
                if draw(st.booleans()) or not shape else [d + draw(st.integers(0, 3)) for d in shape]
        else:
            entries[key]["shape"] = entries[key]["shape"][::-1]
    return entries


@settings(FUZZ, max_examples=max(EXAMPLES // 3, 10))
@given(st.data())
def test_mutated_base_model_headers(model_header, small_lora, tmp_path, data):
    """open_model on a real layout with keys renamed/dropped and shapes changed: a model (whose
    description and LoRA plan work) or a ProloraError."""
    from prolora.plan import build_plan

    path = sparse_model(tmp_path / "m.safetensors", data.draw(model_mutation(model_header)))
    with time_limit():
        try:
            with open_model(path) as m:
                m.describe()
                m.identity()
                build_plan(small_lora, m, m)
            event("ok")
        except ProloraError as e:
            assert "\n" not in str(e)
            event(f"refused: {type(e).__name__}")


@pytest.fixture(scope="module")
def small_lora(sdxl_pair) -> LoraFile:
    lf = read_lora(sdxl_pair["kohya"])
    return LoraFile(lf.format, dict(list(lf.modules.items())[:8]), lf.metadata, lf.dtype, lf.path)


# ----------------------------------------------------------------------------- the command line


def mutated_files(seeds: dict[str, bytes], folder: Path, n: int = 8) -> list[Path]:
    """`n` mutated LoRAs from a fixed seed: header edits and byte damage of each format."""
    rng = random.Random(6)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        raw = bytearray(seeds[sorted(seeds)[i % len(seeds)]])
        (hn,) = struct.unpack("<Q", raw[:8])
        if i % 2:
            for _ in range(3):
                raw[rng.randrange(8, 8 + hn)] = rng.randrange(256)
        else:
            header, body = split(bytes(raw))
            name = rng.choice([k for k in header if k != "__metadata__"])
            header[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(
                [[1, 2], "F64", [0, 0], [2**62, 2], None, "I8"])
            raw = bytearray(join(header, body))
        p = folder / f"mutated {i}.safetensors"
        p.write_bytes(bytes(raw))
        out.append(p)
    return out


def test_cli_on_mutated_files_never_shows_a_traceback(seeds, sdxl_pair, tmp_path, capsys):
    files = mutated_files(seeds, tmp_path / "loras")
    outcomes, transfers_failed = [], 0
    for f in files:
        for args in (["inspect", f], ["transfer", sdxl_pair["source"], sdxl_pair["target"], f, "-o",
                                      tmp_path / "out.safetensors", "--method", "copy", "--no-cache", "-q",
                                      "--overwrite"]):
            capsys.readouterr()
            code = main([str(a) for a in args])
            _, err = capsys.readouterr()
            assert "Traceback" not in err and "internal error" not in err, err
            if code:
                assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("prolora: error:"), err
            outcomes.append(code)
            transfers_failed += bool(code) and args[0] == "transfer"
    assert 2 in outcomes  # the mutations do damage

    # and as a real process over all of them at once (a batch)
    r = subprocess.run(
        [sys.executable, "-m", "prolora.cli", "transfer", str(sdxl_pair["source"]), str(sdxl_pair["target"]),
         "--lora-dir", str(tmp_path / "loras"), "-o", str(tmp_path / "batch"), "--method", "copy", "--no-cache",
         "-q"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "python")})
    assert r.returncode == (2 if transfers_failed else 0)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == transfers_failed and all(x.startswith("FAILED ") for x in lines), r.stderr
    assert f"{len(files) - transfers_failed} written, {transfers_failed} failed" in r.stdout


# ----------------------------------------------------------------------------- hostile metadata

# peft rank/alpha patterns are regular expressions read from the file's metadata; these would take
# exponential (or high-polynomial) time in a backtracking matcher against a module name
HOSTILE_PATTERNS = [r"((.|_)+)+Z", r"(.*)*Z", r"(?:a|.)*(?:a|.)*Z", r".*.*.*.*.*.*.*Z", r"(\w+)\1+Z"]


@pytest.mark.parametrize("pattern", HOSTILE_PATTERNS)
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_hostile_peft_metadata_patterns_are_refused_not_run(tmp_path, pattern, field):
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 2, f"unet.{field}": {pattern: 2}})}
    path = tmp_path / "hostile.safetensors"
    save_file({f"{key}.lora_A.weight": torch.ones(2, 8), f"{key}.lora_B.weight": torch.ones(8, 2)}, str(path),
              metadata=meta)
    with time_limit(5):
        with pytest.raises(ProloraError, match="pattern") as e:
            read_lora(path)
    assert str(path) in str(e.value) and f"unet.{field}" in str(e.value)


def test_ordinary_peft_patterns_still_apply(tmp_path):
    """What diffusers and peft users write (anchored names, simple wildcards) keeps working."""
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    for pattern, alpha in [("^down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 6.0),
                           ("attn1.to_q", 5.0), (".*attn1.*", 3.0), ("down_blocks\\.[0-9]+\\..*to_q", 7.0),
                           ("(attn1|attn2).to_q", 9.0)]:
        meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 2,
                                                     "unet.alpha_pattern": {pattern: alpha}})}
        path = tmp_path / "ok.safetensors"
        save_file({f"{key}.lora_A.weight": torch.ones(2, 8), f"{key}.lora_B.weight": torch.ones(8, 2)}, str(path),
                  metadata=meta)
        assert read_lora(path).modules[key].alpha == alpha, pattern
