"""Targets whose layers have another width: LoRA-X's least-squares map (--widths lstsq), and its
refusal where the subspaces disagree on the channels both widths share."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import prolora
from prolora.cli import main
from prolora.formats import read_lora
from prolora.method import RankSpec, transfer_layer, transfer_layer_widths
from prolora.ops import Basis
from prolora.synthetic import spectral_weight as _spectral, write_lora, write_model


def spectral_weight(m: int, n: int, seed: int) -> torch.Tensor:
    return _spectral((m, n), torch.Generator().manual_seed(seed))


def basis(W: torch.Tensor, k: int) -> Basis:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return Basis(U[:, :k], S[:k], Vh[:k].T, float((S ** 2).sum()))


def lora(m: int, n: int, r: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)


def test_same_width_reduces_to_the_subspace_projection():
    W = spectral_weight(48, 40, seed=1).double()
    B, A = lora(48, 40)
    b = basis(W, 12)
    got = transfer_layer_widths(B, A, b, b, tau=0.8, rank=RankSpec.parse("2r"), r_in=4)
    want = transfer_layer(B, A, b, b, method="subspace", tau=0.8, rank=RankSpec.parse("2r"), r_in=4)
    assert got.record.transferred and got.record.phi_left == pytest.approx(1.0) and got.record.phi_right == pytest.approx(1.0)
    assert torch.allclose(got.up @ got.down, want.up @ want.down, atol=1e-10)


def test_basis_signs_and_rotations_do_not_change_the_result():
    W = spectral_weight(48, 40, seed=2).double()
    Wt = W[:40, :32] + 0.01 * torch.randn(40, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    B, A = lora(48, 40, seed=4)
    s, t = basis(W, 10), basis(Wt, 10)
    flip = torch.where(torch.arange(10) % 3 == 0, -1.0, 1.0).double()
    t2 = Basis(t.U * flip, t.S, t.V * flip, t.energy)
    Q = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0]
    s2 = Basis(s.U @ Q, s.S, s.V @ Q, s.energy)  # another basis of the same subspaces
    r = RankSpec.parse("same")
    a = transfer_layer_widths(B, A, s, t, tau=0.0, rank=r, r_in=4)
    b = transfer_layer_widths(B, A, s2, t2, tau=0.0, rank=r, r_in=4)
    assert a.up.shape == (40, 4) and a.down.shape == (4, 32)
    assert torch.allclose(a.up @ a.down, b.up @ b.down, atol=1e-9)


def test_unrelated_target_is_refused_with_the_reason():
    W = spectral_weight(48, 40, seed=6).double()
    other = spectral_weight(40, 32, seed=7).double()
    B, A = lora(48, 40)
    res = transfer_layer_widths(B, A, basis(W, 10), basis(other, 10), tau=0.8, rank=RankSpec.parse("same"), r_in=4)
    assert not res.record.transferred and res.up is None
    assert "widths differ (48x40 -> 40x32)" in res.record.reason and "meaningless" in res.record.reason


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """An SD1.5-shaped source, and a target in which two linears are narrower: one keeps the
    source's leading channels (pruned), one is unrelated; a LoRA on both."""
    d = tmp_path_factory.mktemp("widths")
    src = write_model(d / "source.safetensors", "sd15:tiny", layout="single-file", seed=0)
    sd = load_file(str(src))
    pruned = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    unrelated = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
    narrowest = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight"
    m, n = sd[pruned].shape
    sd[pruned] = sd[pruned][: m - 4, : n - 4].clone()
    sd[unrelated] = spectral_weight(m - 4, n - 4, seed=9).to(sd[unrelated].dtype)
    sd[narrowest] = sd[narrowest][:8, :8].clone()  # fewer channels than the source's k
    save_file(sd, str(d / "target.safetensors"))
    lora_path = write_lora(src, d / "lora.safetensors", format="kohya", rank=4, targets="attn")
    return {"dir": d, "source": src, "target": d / "target.safetensors", "lora": lora_path, "shape": (m, n)}


def _rows(res):
    return {r.module: r for r in res.report.layers}


def test_refused_by_default_with_a_hint(narrow):
    res = prolora.transfer(narrow["source"], narrow["target"], narrow["lora"], cache=False)
    rows = _rows(res)
    q = rows["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert not q.transferred and "--widths lstsq" in q.reason


def test_lstsq_maps_the_pruned_layer_and_refuses_the_unrelated_one(narrow, tmp_path):
    out = tmp_path / "out.safetensors"
    # tiny layers: a few leading directions (random 4-dim subspaces of 28 channels overlap ~ 4/28)
    res = prolora.transfer(narrow["source"], narrow["target"], narrow["lora"], out, widths="lstsq",
                           subspace="rank:4", cache=False)
    rows = _rows(res)
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    m, n = narrow["shape"]
    assert rows[base + "to_q"].transferred and "least-squares" in rows[base + "to_q"].reason
    assert min(rows[base + "to_q"].phi_left, rows[base + "to_q"].phi_right) > 0.9
    assert not rows[base + "to_k"].transferred and "meaningless" in rows[base + "to_k"].reason
    same = [r for r in rows.values() if r.transferred and r.module != base + "to_q"]
    assert same, "the layers of equal width transfer as usual"
    lf = read_lora(out)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert lf.modules[key].up.shape == (m - 4, 4) and lf.modules[key].down.shape == (4, n - 4)
    assert lf.metadata["prolora.widths"] == "lstsq"


def test_target_narrower_than_the_source_k(narrow):
    res = prolora.transfer(narrow["source"], narrow["target"], narrow["lora"], widths="lstsq", tau=0.0, cache=False)
    row = _rows(res)["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"]
    assert row.transferred and row.k > 8  # the source's k; the target contributes all 8 of its directions
    assert res.lora.modules[row.target_key].up.shape[0] == 8


def test_cli_flag(narrow, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    rc = main(["transfer", str(narrow["source"]), str(narrow["target"]), str(narrow["lora"]), "-o", str(out),
               "--widths", "lstsq", "--subspace", "rank:4", "--no-cache"])
    assert rc == 0 and out.exists()
