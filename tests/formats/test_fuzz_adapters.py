"""Fuzzing of the readers of LyCORIS / DoRA adapters (formats/adapters.py) and of GGUF base models
(gguf_io.py), with the fuzzing contract and helpers of tests/fuzz_common.py: any input parses or
raises a ProloraError with a one-line message, within the time limit, never a large allocation."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors.torch import save_file

from prolora.errors import ProloraError
from prolora.families import open_model
from fuzz_common import FUZZ, byte_mutation, header_edit, parse_or_refuse, time_limit, write


# ----------------------------------------------------------------------------- LyCORIS adapters


@pytest.fixture(scope="module")
def lycoris_seeds(tmp_path_factory) -> dict[str, bytes]:
    """Small valid LoKr, LoHa, LoCon-Tucker, full-difference and DoRA files (as LyCORIS and peft
    lay them out), the starting points of the adapter mutations."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g).half()

    s = "lora_unet_input_blocks_4_1_proj_in"
    files = {
        "lokr": {f"{s}.lokr_w1": r(2, 2), f"{s}.lokr_w2_a": r(4, 2), f"{s}.lokr_w2_b": r(2, 4),
                 f"{s}.alpha": torch.tensor(2.0)},
        "lokr-tucker": {f"{s}.lokr_w1": r(2, 2), f"{s}.lokr_t2": r(2, 2, 3, 3), f"{s}.lokr_w2_a": r(2, 4),
                        f"{s}.lokr_w2_b": r(2, 2), f"{s}.alpha": torch.tensor(1.0)},
        "loha": {f"{s}.hada_w1_a": r(8, 2), f"{s}.hada_w1_b": r(2, 8), f"{s}.hada_w2_a": r(8, 2),
                 f"{s}.hada_w2_b": r(2, 8), f"{s}.alpha": torch.tensor(2.0), f"{s}.dora_scale": r(8, 1).abs()},
        "tucker": {f"{s}.lora_down.weight": r(2, 4, 1, 1), f"{s}.lora_mid.weight": r(2, 2, 3, 3),
                   f"{s}.lora_up.weight": r(8, 2, 1, 1)},
        "full": {f"{s}.diff": r(8, 8), f"{s}.diff_b": r(8)},
        "peft-dora": {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": r(2, 8).float(),
                      "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": r(8, 2).float(),
                      "unet.down_blocks.1.attentions.0.proj_in.lora_magnitude_vector": r(8).float().abs()},
    }
    d = tmp_path_factory.mktemp("fuzz_lycoris")
    out = {}
    for name, tensors in files.items():
        save_file(tensors, str(d / f"{name}.safetensors"))
        out[name] = (d / f"{name}.safetensors").read_bytes()
        assert parse_or_refuse(d / f"{name}.safetensors") == "ok", name
    return out


@FUZZ
@given(st.data())
def test_mutated_lycoris_files(lycoris_seeds, tmp_path, data):
    raw = lycoris_seeds[data.draw(st.sampled_from(sorted(lycoris_seeds)))]
    edit = header_edit(raw) if data.draw(st.booleans()) else byte_mutation(raw)
    event(parse_or_refuse(write(tmp_path, data.draw(edit))))


ADAPTER_SUFFIXES = st.sampled_from([".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b",
                                    ".lokr_t2", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1",
                                    ".hada_t2", ".lora_mid.weight", ".diff", ".diff_b", ".dora_scale", ".alpha",
                                    ".lora_down.weight", ".lora_up.weight"])


@st.composite
def lying_shapes(draw):
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4, 7, 64, 4096]), min_size=1, max_size=4)))
    if math.prod(shape) > 1 << 16:  # a large claim in a small tensor: every dimension but one is 1
        shape = tuple(d if i == 0 else 1 for i, d in enumerate(shape))
    return torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 9)))).half()


@FUZZ
@given(items=st.dictionaries(st.tuples(st.sampled_from(["lora_unet_a_b", "diffusion_model.a.b"]), ADAPTER_SUFFIXES),
                             lying_shapes(), min_size=1, max_size=7))
def test_random_adapter_structures(tmp_path, items):
    """LyCORIS tensor sets with shapes that do not fit together, missing or mixed roles."""
    save_file({a + b: v for (a, b), v in items.items()}, str(tmp_path / "a.safetensors"))
    event(parse_or_refuse(tmp_path / "a.safetensors"))


# ----------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_seed(tmp_path_factory) -> bytes:
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    p = tmp_path_factory.mktemp("fuzz_gguf") / "m.gguf"
    w = gguf.GGUFWriter(str(p), "flux")
    w.add_string("general.name", "seed")
    w.add_array("some.array", [1, 2, 3])
    w.add_array("strings", ["a", "bc"])
    g = torch.Generator().manual_seed(4)
    w.add_tensor("img_in.weight", torch.randn(4, 32, generator=g).numpy())
    w.add_tensor("a.weight", torch.randn(3, 32, generator=g).half().numpy())
    for name, q in (("b.weight", gguf.GGMLQuantizationType.Q8_0), ("c.weight", gguf.GGMLQuantizationType.Q4_0)):
        w.add_tensor(name, quantize(torch.randn(2, 64, generator=g).numpy(), q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p.read_bytes()


def gguf_parse_or_refuse(path: Path) -> str:
    """Read a GGUF every way a run would; 'ok' or 'refused: ...', never another exception."""
    from prolora.gguf_io import GgufFile, read_header as read_gguf

    with time_limit():
        try:
            h = read_gguf(path)
            with GgufFile(path) as f:
                for name, info in h.tensors.items():
                    t = f.get(name)
                    assert tuple(t.shape) == info.shape
                    if t.dim() and t.shape[0]:
                        f.get_rows(name, 0, 1)
                        f.runs(name, [(0, 1)])
            with open_model(path):
                pass
        except ProloraError as e:
            assert "\n" not in str(e) and str(e)
            return f"refused: {type(e).__name__}"
    return "ok"


@st.composite
def gguf_mutation(draw, raw: bytes) -> bytes:
    """Bytes of the header flipped (often to extreme counts), the file cut, bytes inserted or removed."""
    b = bytearray(raw)
    head = min(len(b), 400)
    kind = draw(st.sampled_from(["flip", "flip", "u64", "truncate", "insert", "delete"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 6))):
            b[draw(st.integers(0, head - 1))] = draw(st.integers(0, 255))
    elif kind == "u64":
        pos = draw(st.integers(4, head - 8))
        b[pos:pos + 8] = struct.pack("<Q", draw(st.sampled_from([0, 1, 2**31, 2**40, 2**63, 2**64 - 1, 99, 7])))
    elif kind == "truncate":
        del b[draw(st.integers(0, len(b) - 1)):]
    elif kind == "insert":
        pos = draw(st.integers(0, head))
        b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    else:
        pos = draw(st.integers(0, head - 1))
        del b[pos:pos + draw(st.integers(1, 16))]
    return bytes(b)


@FUZZ
@given(st.data())
def test_mutated_gguf_files(gguf_seed, tmp_path, data):
    assert gguf_parse_or_refuse(write(tmp_path, gguf_seed, "s.gguf")).startswith("refused")  # no model family
    event(gguf_parse_or_refuse(write(tmp_path, data.draw(gguf_mutation(gguf_seed)), "m.gguf")))


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_after_the_gguf_magic(tmp_path, data):
    event(gguf_parse_or_refuse(write(tmp_path, b"GGUF" + data, "r.gguf")))


# ----------------------------------------------------------------------------- scaled fp8 and int8

_QUANT_EDITS = ["scale shape", "scale dtype", "scale value", "drop scale", "drop weight", "weight dtype",
                "SCB shape", "SCB value", "orphan scale"]


@st.composite
def quantized_file(draw) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A ComfyUI scaled-fp8 weight, a bitsandbytes int8 weight and a plain one, with one to three of
    the edits a damaged or hand-made file has (scales of the wrong shape, dtype or value, missing
    partners, weights of another dtype)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    t = {"a.weight": (torch.randn(4, 8, generator=g) * 100).to(torch.float8_e4m3fn),
         "a.scale_weight": torch.tensor(0.01),
         "b.weight": torch.randint(-127, 128, (3, 8), generator=g, dtype=torch.int8),
         "b.SCB": torch.rand(3, generator=g) + 0.5,
         "c.weight": torch.randn(2, 8, generator=g).half()}
    edits = draw(st.lists(st.sampled_from(_QUANT_EDITS), min_size=1, max_size=3))
    odd = st.sampled_from([float("nan"), float("inf"), -1.0, 0.0, 1e30])
    for e in edits:
        if e == "scale shape" and "a.scale_weight" in t:
            t["a.scale_weight"] = torch.full(draw(st.sampled_from([(1,), (2,), (4, 1), (0,)])), 0.01)
        elif e == "scale dtype" and "a.scale_weight" in t:
            t["a.scale_weight"] = t["a.scale_weight"].to(draw(st.sampled_from([torch.float16, torch.int64, torch.bool])))
        elif e == "scale value" and "a.scale_weight" in t:
            t["a.scale_weight"] = torch.full(t["a.scale_weight"].shape, draw(odd))  # float32 again
        elif e == "drop scale":
            t.pop(draw(st.sampled_from(["a.scale_weight", "b.SCB"])), None)
        elif e == "drop weight":
            t.pop(draw(st.sampled_from(["a.weight", "b.weight"])), None)
        elif e == "weight dtype" and "b.weight" in t:
            t["b.weight"] = t["b.weight"].to(draw(st.sampled_from([torch.float16, torch.uint8, torch.float8_e4m3fn])))
        elif e == "SCB shape" and "b.SCB" in t:
            t["b.SCB"] = torch.ones(draw(st.sampled_from([(2,), (4,), (3, 1), ()])))
        elif e == "SCB value" and "b.SCB" in t:
            t["b.SCB"][draw(st.integers(0, t["b.SCB"].numel() - 1))] = draw(odd)
        elif e == "orphan scale":
            t["z.scale_weight"] = torch.tensor(2.0)
    return t, edits


@FUZZ
@given(data=quantized_file())
def test_mutated_quantized_safetensors(tmp_path, data):
    """Every way a run reads a quantized safetensors base: refused in one line, or each weight read
    as its stored value times the scale that sits beside it (never a scale silently ignored, never
    a scale read as a weight)."""
    from prolora.tensor_files import open_file, read_header as read_base_header

    tensors, edits = data
    path = tmp_path / "q.safetensors"
    save_file(tensors, str(path))
    with time_limit():
        try:
            header = read_base_header(path)
            f = open_file(path)
            try:
                got = {k: f.get(k) for k in header.tensors}
                rows = {k: f.get_rows(k, 0, 1) for k in header.tensors if header.tensors[k].shape}
            finally:
                f.close()
        except ProloraError as e:
            assert "\n" not in str(e) and str(e)
            event(f"refused: {type(e).__name__}")
            return
    event("ok")
    for k in header.tensors:  # a scale beside its weight is hidden: read with it, never as a weight
        assert not (k.endswith((".scale_weight", ".SCB")) and k.rsplit(".", 1)[0] + ".weight" in tensors), (k, edits)
    for k, v in got.items():
        stem = k[: -len(".weight")]
        want = tensors[k].float() if tensors[k].dtype != torch.bool else tensors[k]
        if stem + ".scale_weight" in tensors:
            want = tensors[k].float() * tensors[stem + ".scale_weight"].float().reshape(-1)[0]
        elif stem + ".SCB" in tensors:
            want = tensors[k].float() * tensors[stem + ".SCB"].float()[:, None] / 127
        assert torch.equal(v.float(), want.float()) or torch.allclose(v.float(), want.float(), equal_nan=True), (k, edits)
        if k in rows:
            assert torch.allclose(rows[k].float(), v[:1].float(), equal_nan=True), (k, edits)
