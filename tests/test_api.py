"""End-to-end transfers through the public API on synthetic models in real layouts."""
from __future__ import annotations

import json

import pytest
import torch

import prolora
from prolora.families import open_model
from prolora.errors import NothingTransferredError, OptionError
from prolora.formats import read_lora, write_lora
from prolora.lora import LoraFile, LoraModule


def merged(lm: LoraModule) -> torch.Tensor:
    r = lm.rank
    return lm.scale * lm.up.double().reshape(lm.up.shape[0], r) @ lm.down.double().reshape(r, -1)


def by_module(lora: LoraFile, model) -> dict[str, torch.Tensor]:
    """Merged dW per canonical module id, whatever the file's spelling."""
    out = {}
    for key, lm in lora.modules.items():
        module, _ = model.resolve(key)
        out[module] = merged(lm)
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm())


def fp32_copy(src, dst):
    """The same LoRA with float32 tensors (so identities can be checked tightly)."""
    lf = read_lora(src)
    mods = {k: LoraModule(k, m.down.float(), m.up.float(), m.alpha) for k, m in lf.modules.items()}
    write_lora(dst, LoraFile(lf.format, mods, lf.metadata, torch.float32))
    return dst


def test_transfer_writes_lora_report_and_provenance(sdxl_pair, tmp_path):
    out = tmp_path / "out.safetensors"
    res = prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["kohya"], out)
    assert res.output == out and out.exists()
    back = read_lora(out)
    src = read_lora(sdxl_pair["kohya"])
    assert back.format == "kohya" and set(back.modules) <= set(src.modules)
    s = res.report.summary()
    assert s["layers"] == len(src.modules) and s["transferred"] == len(back.modules) > 0
    for r in res.report.layers:
        assert r.module and r.shape and r.k and 0.0 <= r.phi_left <= 1.0 and 0.0 <= r.phi_right <= 1.0
        assert r.transferred == (min(r.phi_left, r.phi_right) >= 0.8)
    md = back.metadata
    assert md["prolora.method"] == "prolora-full" and md["prolora.tau"] == "0.8"
    assert md["prolora.subspace"] == "energy:0.9"
    with open_model(sdxl_pair["target"]) as t:
        assert md["prolora.target_id"] == t.identity()
    assert md["ss_network_dim"] == "4"  # input metadata carried over


def test_same_model_prolora_full_is_identity(sdxl_pair, tmp_path):
    """docs/method.md identity 1 end to end: target == source gives dW back, for linear and conv layers."""
    lora = fp32_copy(sdxl_pair["conv"], tmp_path / "conv32.safetensors")
    res = prolora.transfer(sdxl_pair["source"], sdxl_pair["source"], lora, tmp_path / "o.safetensors",
                           backends={"*": "reference"})
    assert res.report.summary()["transferred"] == res.report.summary()["layers"]
    with open_model(sdxl_pair["source"]) as m:
        want, got = by_module(read_lora(lora), m), by_module(read_lora(res.output), m)
        assert set(got) == set(want)
        assert max(rel(got[k], want[k]) for k in want) < 1e-6
        # identity 6: conv factors keep the kernel shapes loaders expect
        convs = [lm for lm in read_lora(res.output).modules.values() if lm.is_conv]
        assert convs
        for lm in convs:
            module, _ = m.resolve(lm.key)
            shape = m.weights[module].shape
            assert lm.up.shape == (shape[0], lm.rank, 1, 1) and lm.down.shape == (lm.rank, *shape[1:])


def test_copy_is_bit_for_bit(sdxl_pair, tmp_path):
    res = prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["kohya"],
                           tmp_path / "o.safetensors", method="copy")
    src, out = read_lora(sdxl_pair["kohya"]), read_lora(res.output)
    assert set(out.modules) == set(src.modules)
    for k, lm in src.modules.items():
        assert torch.equal(out.modules[k].up, lm.up) and torch.equal(out.modules[k].down, lm.down)
        assert out.modules[k].alpha == lm.alpha


def test_alpha_convention_does_not_change_dw(sdxl_pair, tmp_path):
    lora = fp32_copy(sdxl_pair["kohya"], tmp_path / "k32.safetensors")
    keep = prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], lora, tmp_path / "keep.safetensors", alpha="keep")
    rank = prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], lora, tmp_path / "rank.safetensors", alpha="rank")
    a, b = read_lora(keep.output), read_lora(rank.output)
    assert {m.alpha for m in a.modules.values()} == {2.0}  # the input's alpha (rank 4, alpha 2)
    assert {m.alpha for m in b.modules.values()} == {4.0}  # alpha = output rank
    for k in a.modules:
        assert rel(merged(a.modules[k]), merged(b.modules[k])) < 1e-6


@pytest.mark.parametrize("fmt", ["kohya", "peft", "comfy", "diffusers-old"])
def test_output_formats_agree(sdxl_pair, tmp_path, fmt):
    """Writing any format gives the same merged dW per module as the input's own format."""
    lora = fp32_copy(sdxl_pair["kohya"], tmp_path / "k32.safetensors")
    same = prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], lora, tmp_path / "same.safetensors")
    other = prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], lora, tmp_path / f"{fmt}.safetensors", format=fmt)
    out = read_lora(other.output)
    assert out.format == fmt
    with open_model(sdxl_pair["target"]) as t:
        a, b = by_module(read_lora(same.output), t), by_module(out, t)
    assert set(a) == set(b) and max(rel(b[k], a[k]) for k in a) < 1e-6


def test_prolora_ranks_and_compression(sdxl_pair, tmp_path):
    exact = prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["peft"],
                             tmp_path / "2r.safetensors", method="prolora", rank="2r")
    squeezed = prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["peft"],
                                tmp_path / "r.safetensors", method="prolora", rank="same")
    assert {m.rank for m in read_lora(exact.output).modules.values()} == {8}
    assert {m.rank for m in read_lora(squeezed.output).modules.values()} == {4}
    energies = [r.retained_energy for r in squeezed.report.layers if r.transferred]
    assert energies and all(0.0 <= e <= 1.0 for e in energies)
    assert all(r.retained_energy is None for r in exact.report.layers)


def test_gate_drop_and_copy(sdxl_pair, tmp_path):
    with pytest.raises(NothingTransferredError, match="tau"):
        prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["kohya"], tmp_path / "x.safetensors", tau=1.0)
    assert not (tmp_path / "x.safetensors").exists()
    res = prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["kohya"], tmp_path / "c.safetensors",
                           tau=1.0, skipped="copy")
    assert res.report.summary()["transferred"] == 0
    assert len(read_lora(res.output).modules) == len(read_lora(sdxl_pair["kohya"]).modules)


def test_sd15_pair_transfers(sd15_pair, tmp_path):
    res = prolora.transfer(sd15_pair["source"], sd15_pair["target"], sd15_pair["kohya"], tmp_path / "o.safetensors")
    assert res.report.summary()["transferred"] > 0
    assert all(k.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_te_"))
               for k in read_lora(res.output).modules)


def test_report_json(sdxl_pair, tmp_path):
    res = prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["kohya"], tmp_path / "o.safetensors")
    res.report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"]["layers"] == len(data["layers"])
    need = {"module", "source_key", "target_key", "shape", "k", "phi_left", "phi_right", "transferred", "reason"}
    assert all(need <= set(row) for row in data["layers"])
    assert data["info"]["method"] == "prolora-full"


def test_similarity(sdxl_pair):
    res = prolora.similarity(sdxl_pair["source"], sdxl_pair["source"], layers=r"attn1\.to_q")
    assert res.report.layers and all(r.phi_left == pytest.approx(1.0) and r.phi_right == pytest.approx(1.0)
                                     for r in res.report.layers)
    res = prolora.similarity(sdxl_pair["source"], sdxl_pair["target"], layers="attn")
    assert all(0.0 <= r.phi_left <= 1.0 and r.k >= 1 for r in res.report.layers)
    with pytest.raises(OptionError):
        prolora.similarity(sdxl_pair["source"], sdxl_pair["target"], layers="(")


def test_inspect(sdxl_pair):
    lora = prolora.inspect(sdxl_pair["kohya"])
    assert lora["kind"] == "lora" and lora["format"] == "kohya" and lora["family"] == "sdxl"
    model = prolora.inspect(sdxl_pair["target"])
    assert model["kind"] == "model" and model["family"] == "sdxl"
