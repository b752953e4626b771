"""SDXL -> SSD-1B-like transfer: a target with fewer transformer blocks, built by diffusers, whose
blocks are a permuted subset of the source's (plus a perturbation). Similarity matching must
recover the true block correspondence; name matching cannot."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from zoo import SDXL_UNET  # noqa: E402

import prolora  # noqa: E402
from prolora.formats import read_lora  # noqa: E402
from prolora.synthetic import write_lora  # noqa: E402

# the source: an SDXL-shaped tiny UNet with 5 blocks per attention at the lowest level
SRC_UNET = dict(SDXL_UNET, transformer_layers_per_block=[1, 2, 5])
# the target: SSD-1B-like (fewer blocks in down_blocks.2 and up_blocks.0/1, no mid attention)
TGT_UNET = dict(SDXL_UNET, transformer_layers_per_block=[1, 2, 2], mid_block_type="UNetMidBlock2D",
                reverse_transformer_layers_per_block=[[2, 2, 5], [2, 1, 1], [1, 1, 1]])
BLOCK = re.compile(r"^(.*attentions\.\d+)\.transformer_blocks\.(\d+)\.(.*)$")


def _build_pair(tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    src = UNet2DConditionModel(**SRC_UNET)
    tgt = UNet2DConditionModel(**TGT_UNET)
    s_state, t_state = src.state_dict(), tgt.state_dict()
    depth = {}
    for name in t_state:
        m = BLOCK.match(name)
        if m:
            depth[m[1]] = max(depth.get(m[1], 0), int(m[2]) + 1)
    src_depth = {}
    for name in s_state:
        m = BLOCK.match(name)
        if m:
            src_depth[m[1]] = max(src_depth.get(m[1], 0), int(m[2]) + 1)
    g = torch.Generator().manual_seed(1)
    truth = {}  # (attention, target block) -> source block
    for attn, n in depth.items():
        if src_depth[attn] != n:
            perm = torch.randperm(src_depth[attn], generator=g)[:n].tolist()
            truth.update({(attn, j): perm[j] for j in range(n)})
    new = {}
    for name, w in t_state.items():
        m = BLOCK.match(name)
        key = name
        if m and (m[1], int(m[2])) in truth:
            key = f"{m[1]}.transformer_blocks.{truth[(m[1], int(m[2]))]}.{m[3]}"
        base = s_state[key]
        noise = torch.randn(base.shape, generator=g) * 0.03 * base.std() if base.numel() > 1 else 0
        new[name] = base + noise
    tgt.load_state_dict(new)
    src.save_pretrained(tmp_path / "sdxl_unet")
    tgt.save_pretrained(tmp_path / "ssd_unet")
    # canonical ids carry the component
    return tmp_path / "sdxl_unet", tmp_path / "ssd_unet", {(f"unet.{a}", j): s for (a, j), s in truth.items()}


def test_similarity_matching_recovers_the_block_correspondence(tmp_path):
    source, target, truth = _build_pair(tmp_path)
    assert truth and any(j != s for (_, j), s in truth.items())  # a real permutation, not the identity
    lora = write_lora(source, tmp_path / "lora.safetensors", format="kohya", rank=4, targets="transformer")
    res = prolora.transfer(source, target, lora, tmp_path / "out.safetensors", tau=0.0)
    found = {(m["attention"], m["target_block"]): m["source_block"] for m in res.report.info["matching"]}
    assert found == truth
    assert all(m["score"] > 0.9 for m in res.report.info["matching"])
    # the output adapts the target's blocks with the LoRA of the matched source blocks
    out = read_lora(res.output)
    from prolora.families import open_model

    with open_model(target) as t:
        adapted = {t.resolve(k)[0] for k in out.modules}
    for (attn, j), s in truth.items():
        assert f"{attn}.transformer_blocks.{j}.attn1.to_q" in adapted
        row = next(r for r in res.report.layers if r.module == f"{attn}.transformer_blocks.{s}.attn1.to_q")
        assert row.target_key and t_name(row.target_key, target) == f"{attn}.transformer_blocks.{j}.attn1.to_q"
    by_source = {r.source_key: r for r in res.report.layers}
    skipped = [r for r in res.report.layers if not r.transferred]
    assert any("block removed in the target" in r.reason for r in skipped)
    assert any("no counterpart" in r.reason for r in skipped)  # the mid-block attention SSD-1B lacks
    assert by_source


def t_name(key, target):
    from prolora.families import open_model

    with open_model(target) as t:
        return t.resolve(key)[0]


def test_name_matching_gets_it_wrong(tmp_path):
    source, target, truth = _build_pair(tmp_path)
    lora = write_lora(source, tmp_path / "lora.safetensors", format="kohya", rank=4, targets="attn")
    res = prolora.transfer(source, target, lora, tmp_path / "out.safetensors", tau=0.0, match="name")
    assert "matching" not in res.report.info or not res.report.info["matching"]
    # by name, target block j gets source block j: wrong wherever the permutation moved a block,
    # which the similarity of those layers shows
    wrong = {(a, j) for (a, j), s in truth.items() if s != j}
    phis = [min(r.phi_left, r.phi_right) for r in res.report.layers
            if r.transferred and any(f"{a}.transformer_blocks.{j}." in r.module for a, j in wrong)]
    right = [min(r.phi_left, r.phi_right) for r in res.report.layers
             if r.transferred and ".transformer_blocks." in r.module
             and not any(f"{a}.transformer_blocks.{j}." in r.module for a, j in wrong)]
    assert phis and right and max(phis) < min(right)
