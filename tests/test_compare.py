"""`prolora compare` and the transfer heatmap."""
import json

import pytest
import torch

import prolora
from prolora.cli import main
from prolora.agreement import compare_modules, inner
from prolora.formats import read_lora
from prolora.lora import LoraModule


def mod(key, out, inp, r, alpha, seed, conv=False):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(r, inp, 3, 3, generator=g) if conv else torch.randn(r, inp, generator=g)
    up = torch.randn(out, r, 1, 1, generator=g) if conv else torch.randn(out, r, generator=g)
    return LoraModule(key, down, up, alpha)


def dense(m):
    return m.scale * m.up.double().reshape(m.up.shape[0], m.rank) @ m.down.double().reshape(m.rank, -1)


def test_low_rank_inner_product_equals_dense():
    a, b = mod("x", 20, 12, 3, 1.5, 0), mod("x", 20, 12, 5, None, 1)
    assert inner(a, b) == pytest.approx(float((dense(a) * dense(b)).sum()), rel=1e-12)
    c, d = mod("c", 8, 4, 2, 4.0, 2, conv=True), mod("c", 8, 4, 3, 1.0, 3, conv=True)
    assert inner(c, d) == pytest.approx(float((dense(c) * dense(d)).sum()), rel=1e-12)


def test_agreement_figures():
    a = {"x": mod("x", 20, 12, 3, 1.5, 0), "y": mod("y", 6, 6, 2, None, 4), "only_a": mod("z", 4, 4, 1, None, 5)}
    twice = LoraModule("x", a["x"].down, a["x"].up * 2, 1.5)  # b's x is twice a's
    b = {"x": twice, "y": a["y"], "only_b": mod("w", 4, 4, 1, None, 6)}
    ag = compare_modules(a, b)
    per = {x.module: x for x in ag.layers}
    assert per["x"].cosine == pytest.approx(1.0) and per["x"].energy_ratio == pytest.approx(0.25)
    assert per["x"].rel_error == pytest.approx(0.5)
    assert per["y"].cosine == pytest.approx(1.0) and per["y"].rel_error == pytest.approx(0.0, abs=1e-12)
    assert ag.only_a == ["only_a"] and ag.only_b == ["only_b"]
    s = ag.summary()
    x2, y2 = float(dense(a["x"]).norm() ** 2), float(dense(a["y"]).norm() ** 2)
    # overall: the layers concatenated into one vector, [2x, y] against [x, y]
    assert s["cosine"] == pytest.approx((2 * x2 + y2) / ((4 * x2 + y2) * (x2 + y2)) ** 0.5)
    assert s["energy_ratio"] == pytest.approx((x2 + y2) / (4 * x2 + y2)) and s["shared_layers"] == 2


def test_compare_a_transfer_with_its_input_across_formats(sdxl_pair, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    prolora.transfer(sdxl_pair["source"], sdxl_pair["source"], sdxl_pair["kohya"], out, format="peft")
    res = prolora.compare(out, sdxl_pair["kohya"], base=sdxl_pair["source"])
    s = res.agreement.summary()
    assert s["shared_layers"] == len(read_lora(sdxl_pair["kohya"]).modules)
    assert s["cosine"] > 0.999 and s["rel_error"] < 0.01  # same model: prolora-full gives dW back
    with pytest.raises(prolora.errors.OptionError, match="--base"):
        prolora.compare(out, sdxl_pair["kohya"])
    assert main(["compare", str(out), str(sdxl_pair["kohya"]), "--base", str(sdxl_pair["source"]),
                 "--json", str(tmp_path / "c.json")]) == 0
    assert "overall cosine" in capsys.readouterr().out
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["summary"]["shared_layers"] == s["shared_layers"] and data["layers"]


def test_transfer_plot(sdxl_pair, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "h.png"
    assert main(["transfer", str(sdxl_pair["source"]), str(sdxl_pair["target"]), str(sdxl_pair["kohya"]),
                 "-o", str(tmp_path / "o.safetensors"), "--plot", str(png), "--tau", "0.97", "-q"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
