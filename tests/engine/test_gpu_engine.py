"""On a real GPU (`-m gpu`; benchmarks/gpu_check.sh runs it): what tests/engine/test_fake_cuda.py
checks on the fake device, on the device itself. Cold and warm --device cuda transfers with the
cache on, under a small --max-gpu-memory, give the CPU path's result (streams and events out of
order would not), read no weight when warm, and stay within the budget (plus the solvers'
workspaces)."""
from __future__ import annotations

import pytest
import torch

import prolora
from benchmarks.gpu_transfer import compare
from prolora.synthetic import write_lora, write_pair

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

BUDGET = 64 << 20
WORKSPACE = 64 << 20  # cuBLAS / cuSOLVER workspaces come from the same allocator


@pytest.mark.parametrize("kind,cfg,fmt", [("sdxl", "sdxl:tiny", "kohya"), ("flux", "flux-dev:tiny", "peft")])
def test_gpu_cache_on_transfers_match_the_cpu(kind, cfg, fmt, tmp_path):
    src, tgt = write_pair(tmp_path / "source.safetensors", tmp_path / "target", cfg, seed=5)
    lora = write_lora(src, tmp_path / "lora.safetensors", format=fmt, rank=4,
                      targets="transformer" if kind == "sdxl" else "all", seed=6)
    cpu = prolora.transfer(src, tgt, lora, tmp_path / "cpu.safetensors", cache=False)
    for label in ("cold", "warm"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        res = prolora.transfer(src, tgt, lora, tmp_path / f"{label}.safetensors", device="cuda",
                               max_gpu_memory=BUDGET, cache_dir=str(tmp_path / "cache"))
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - base <= BUDGET + WORKSPACE
        gap = compare(res.output, cpu.output)
        assert gap["same_keys"] and gap["worst_layer_rel_error"] < 1e-4, gap
        assert [x.transferred for x in res.report.layers] == [x.transferred for x in cpu.report.layers]
    assert res.report.info["engine"]["bytes_read"] == 0
