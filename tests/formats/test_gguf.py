"""Quantized base models (gguf_io.py, tensor_files.py): GGUF written by the `gguf` package, ComfyUI
scaled fp8, plain fp8, bitsandbytes int8 read dequantized; NF4 and SVDQuant refused by name; a
transfer onto a quantized target equals the transfer onto the same weights dequantized into
safetensors."""
from __future__ import annotations

import os
import struct

import pytest
import torch

import prolora
from prolora.cli import main
from prolora.errors import CorruptFileError, UnsupportedFormatError
from prolora.families import open_model
from prolora.formats import read_lora
from prolora.gguf_io import GgufFile, read_header
from prolora.safetensors_io import load_all, save
from prolora.synthetic import write_lora, write_model

gguf = pytest.importorskip("gguf")
from gguf_files import dequantized_safetensors, write_gguf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1"]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_flux")
    src = write_model(d / "src.safetensors", "flux-dev:tiny", layout="single-file", seed=0)
    tgt = write_model(d / "tgt.safetensors", "flux-dev:tiny", layout="single-file", seed=0, base=src)
    return {"dir": d, "source": src, "target": tgt, "lora": write_lora(src, d / "k.safetensors", "kohya", rank=4)}


def _dense(m) -> torch.Tensor:
    return m.scale * (m.up.double().flatten(1) @ m.down.double().flatten(1))


def _same_output(a, b, tol: float = 1e-4) -> float:
    la, lb = read_lora(a), read_lora(b)
    assert set(la.modules) == set(lb.modules)
    worst = 0.0
    for k, m in lb.modules.items():
        want = _dense(m)
        worst = max(worst, float((_dense(la.modules[k]) - want).norm() / want.norm()))
    assert worst <= tol, worst
    return worst


def _k_blocks(qtype: str, rows: int, cols: int, g: torch.Generator):
    """Random K-quant blocks with finite fp16 scales (d, dmin) where each format keeps them."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = torch.randint(0, 256, (rows * cols // block, size), generator=g, dtype=torch.uint8)
    scales = torch.tensor([0.01, 0.002], dtype=torch.float16).view(torch.uint8)
    at = {"Q6_K": [size - 2], "Q5_K": [0, 2], "Q4_K": [0, 2]}[qtype]
    for i, o in enumerate(at):
        raw[:, o:o + 2] = scales[2 * i:2 * i + 2]
    return raw.reshape(rows, -1).numpy()


@pytest.mark.parametrize("qtype", QTYPES)
def test_reader_matches_gguf_dequantize(tmp_path, qtype):
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    g = torch.Generator().manual_seed(0)
    a = (torch.randn(6, 512, generator=g)).numpy()
    b = torch.randn(5, generator=g).numpy()
    w = GGUFWriter(str(tmp_path / "m.gguf"), "flux")
    q = GGMLQuantizationType[qtype]
    if qtype.endswith("_K"):  # gguf dequantizes K-quants but cannot quantize them: valid random blocks
        data = _k_blocks(qtype, 6, 512, g)
    else:
        data = a if qtype == "F32" else quantize(a, q)
    w.add_tensor("w", data, raw_dtype=None if qtype == "F32" else q)
    w.add_tensor("b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    h = read_header(tmp_path / "m.gguf")
    assert h.tensors["w"].shape == (6, 512) and h.tensors["w"].dtype == qtype and h.tensors["b"].shape == (5,)
    ref = torch.from_numpy(gguf.quants.dequantize(gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors[0].data, q).copy())
    with GgufFile(tmp_path / "m.gguf") as f:
        assert torch.equal(f.get("w").float(), ref.reshape(6, 512).float())
        assert torch.equal(f.get_rows("w", 2, 4).float(), ref.reshape(6, 512)[2:4].float())
        assert torch.equal(f.get("b"), torch.from_numpy(b))
        assert f.runs("w", [(512 + 3, 4)]) == ref.reshape(6, 512)[1, 3:7].float().numpy().tobytes()


@pytest.mark.parametrize("qtype,prefix", [("Q8_0", ""), ("Q4_0", "model.diffusion_model.")])
def test_gguf_target_gives_the_output_of_its_dequantized_weights(flux, tmp_path, qtype, prefix):
    g = write_gguf(flux["target"], tmp_path / "t.gguf", qtype, prefix=prefix)
    st = dequantized_safetensors(g, tmp_path / "t.safetensors")
    r1 = prolora.transfer(flux["source"], g, flux["lora"], tmp_path / "a.safetensors", cache=False)
    prolora.transfer(flux["source"], st, flux["lora"], tmp_path / "b.safetensors", cache=False)
    _same_output(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    q = r1.report.info["target_quantization"]
    assert q["storage"] == "GGUF" and qtype in q["dtypes"]
    assert any("4 bits" in w for w in r1.report.warnings) == (qtype == "Q4_0")
    with open_model(g) as m:
        assert m.family == "flux" and prolora.inspect(g)["quantization"]["bits"] == int(qtype[1])


def test_sdxl_gguf_source(sdxl_pair, tmp_path):
    """An SDXL single file (SGM keys under model.diffusion_model., CLIP encoders) as GGUF: the SD
    family's key map reads it unchanged; conv and 1-D tensors stay F32."""
    g = write_gguf(sdxl_pair["source"], tmp_path / "s.gguf", "Q8_0", arch="sdxl")
    st = dequantized_safetensors(g, tmp_path / "s.safetensors", torch.float16)
    prolora.transfer(g, sdxl_pair["target"], sdxl_pair["kohya"], tmp_path / "a.safetensors", cache=False)
    prolora.transfer(st, sdxl_pair["target"], sdxl_pair["kohya"], tmp_path / "b.safetensors", cache=False)
    _same_output(tmp_path / "a.safetensors", tmp_path / "b.safetensors", 2e-3)  # fp16 copy of the dequantized
    with open_model(g) as m:
        assert m.family == "sdxl"


def test_gguf_source_and_its_cache_identity(flux, tmp_path):
    """A GGUF model has a content identity: the second run reads its bases from the cache."""
    g = write_gguf(flux["source"], tmp_path / "s.gguf", "Q8_0")
    cache = str(tmp_path / "cache")
    outs = []
    for i in range(2):
        res = prolora.transfer(g, flux["target"], flux["lora"], tmp_path / f"o{i}.safetensors", cache_dir=cache)
        outs.append((tmp_path / f"o{i}.safetensors").read_bytes())
    assert res.report.info["engine"]["cache_misses"] == 0 and outs[0] == outs[1]
    with open_model(g) as a, open_model(write_gguf(flux["source"], tmp_path / "s4.gguf", "Q4_0")) as b, \
            open_model(flux["source"]) as c:
        assert len({a.identity(), b.identity(), c.identity()}) == 3


def test_truncated_and_hostile_gguf_are_one_line_exit_2_nothing_written(flux, tmp_path, capsys):
    g = write_gguf(flux["target"], tmp_path / "t.gguf", "Q8_0")
    raw = g.read_bytes()
    cases = {"truncated": raw[: len(raw) // 2], "header cut": raw[:40],
             "absurd count": raw[:8] + struct.pack("<Q", 2 ** 60) + raw[16:],
             "version": raw[:4] + struct.pack("<I", 7) + raw[8:]}
    for name, data in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.gguf"
        bad.write_bytes(data)
        out = tmp_path / f"o_{bad.stem}.safetensors"
        rc = main(["transfer", str(flux["source"]), str(bad), str(flux["lora"]), "-o", str(out), "--no-cache", "-q"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and str(bad) in err, (name, err)
        assert not out.exists() and not any(p.name.startswith(f".o_{bad.stem}") for p in tmp_path.iterdir())


def test_unknown_and_unread_quant_types_are_named(tmp_path):
    from gguf import GGMLQuantizationType, GGUFWriter

    w = GGUFWriter(str(tmp_path / "q.gguf"), "flux")
    w.add_tensor("w", torch.zeros(2, 84, dtype=torch.uint8).numpy(), raw_dtype=GGMLQuantizationType.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedFormatError, match="Q2_K"):
        read_header(tmp_path / "q.gguf")
    raw = bytearray((tmp_path / "q.gguf").read_bytes())
    at = raw.index(b"w", 24) + 1 + 4 + 16  # after the name, n_dims and two dims: the type
    raw[at:at + 4] = struct.pack("<I", 99)
    (tmp_path / "u.gguf").write_bytes(bytes(raw))
    with pytest.raises(UnsupportedFormatError, match="unknown ggml type 99"):
        read_header(tmp_path / "u.gguf")


# ----------------------------------------------------------------------------- fp8, int8, refusals


def _fp8_files(target, tmp_path, scaled: bool):
    tensors, meta = load_all(target)
    q, ref = {}, {}
    for k, t in tensors.items():
        if t.dim() == 2 and k.endswith(".weight"):
            s = float(t.float().abs().max()) / 448.0 if scaled else 1.0
            w8 = (t.float() / s).to(torch.float8_e4m3fn)
            q[k], ref[k] = w8, w8.float() * s
            if scaled:
                q[k[: -len(".weight")] + ".scale_weight"] = torch.tensor(s, dtype=torch.float32)
        else:
            q[k] = ref[k] = t
    if scaled:
        q["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    save(tmp_path / "q.safetensors", q, meta)
    save(tmp_path / "r.safetensors", ref, meta)
    return tmp_path / "q.safetensors", tmp_path / "r.safetensors"


@pytest.mark.parametrize("scaled", [True, False])
def test_fp8_target_reads_with_its_scale(flux, tmp_path, scaled):
    q, ref = _fp8_files(flux["target"], tmp_path, scaled)
    r = prolora.transfer(flux["source"], q, flux["lora"], tmp_path / "a.safetensors", cache=False)
    prolora.transfer(flux["source"], ref, flux["lora"], tmp_path / "b.safetensors", cache=False)
    _same_output(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert r.report.info["target_quantization"]["dtypes"].get("F8_E4M3")


def test_bitsandbytes_int8_reads_and_nf4_svdquant_are_refused(flux, tmp_path):
    tensors, meta = load_all(flux["target"])
    q, ref = {}, {}
    for k, t in tensors.items():
        if t.dim() == 2 and k.endswith(".weight"):
            scb = t.float().abs().amax(dim=1).clamp_min(1e-8)
            q[k] = torch.round(t.float() / scb[:, None] * 127).to(torch.int8)
            q[k[: -len(".weight")] + ".SCB"] = scb
            ref[k] = q[k].float() * scb[:, None] / 127
        else:
            q[k] = ref[k] = t
    save(tmp_path / "q.safetensors", q, meta)
    save(tmp_path / "r.safetensors", ref, meta)
    prolora.transfer(flux["source"], tmp_path / "q.safetensors", flux["lora"], tmp_path / "a.safetensors", cache=False)
    prolora.transfer(flux["source"], tmp_path / "r.safetensors", flux["lora"], tmp_path / "b.safetensors", cache=False)
    _same_output(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    for key, kind in [("img_in.weight.quant_state.bitsandbytes__nf4", "NF4"), ("img_in.wscales", "SVDQuant")]:
        save(tmp_path / "x.safetensors", {**tensors, key: torch.zeros(2, dtype=torch.uint8)}, meta)
        with pytest.raises(UnsupportedFormatError, match=kind):
            open_model(tmp_path / "x.safetensors")


def test_gguf_header_checks_every_count(tmp_path):
    """Counts, strings and offsets that lie are refused before anything is allocated for them."""
    good = tmp_path / "g.gguf"
    from gguf import GGUFWriter

    w = GGUFWriter(str(good), "flux")
    w.add_tensor("w", torch.randn(2, 32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    raw = good.read_bytes()
    assert read_header(good).tensors["w"].shape == (2, 32)
    for data in [raw[:3], raw[:20], raw[:-8], raw[:4] + struct.pack("<I", 3) + struct.pack("<Q", 1) +
                 struct.pack("<Q", 1) + struct.pack("<Q", 2 ** 40) + b"k"]:
        (tmp_path / "b.gguf").write_bytes(data)
        with pytest.raises((CorruptFileError, UnsupportedFormatError)) as e:
            read_header(tmp_path / "b.gguf")
        assert "\n" not in str(e.value)
    assert os.path.getsize(good) == len(raw)
