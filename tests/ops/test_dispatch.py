"""Dispatch as a user meets it: a forced backend runs wherever it can run the problem and is
refused up front, in one line, where it cannot; `bench --device cuda --dry-run` plans full-size
GPU runs within the device budget without reading or computing anything."""
from __future__ import annotations

import json

import pytest
import torch

from prolora.cli import main
from prolora.ops import project_lora, small_svd, truncated_svd
from prolora.ops.registry import Problem

NO_GPU = not torch.cuda.is_available()


@pytest.mark.skipif(not NO_GPU, reason="checks the refusals of a machine without CUDA")
@pytest.mark.parametrize("spec,device,expect", [
    ("triton", "cpu", "backend 'triton' cannot run here: no CUDA device"),
    ("gram-triton", "cpu", "backend 'gram-triton' cannot run truncated_svd here: no CUDA device"),
    ("project_lora=triton", "cpu", "backend 'triton' cannot run project_lora here: no CUDA device"),
    ("native", "cuda", "device 'cuda': no CUDA device is available here"),
    ("nope", "cpu", "--backend nope: no such backend"),
])
def test_forced_backends_that_cannot_run_are_refused_in_one_line(sdxl_pair, tmp_path, capsys, spec, device, expect):
    out = tmp_path / "o.safetensors"
    rc = main(["transfer", str(sdxl_pair["source"]), str(sdxl_pair["target"]), str(sdxl_pair["kohya"]), "-o",
               str(out), "--backend", spec, "--device", device, "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("prolora: error:") and expect in err[0], err
    assert not out.exists()


def test_a_forced_backend_runs_where_it_is_not_the_default():
    """Measurements choose defaults, never permissions: on CPU the native small SVD is the
    default only up to 12x12, and forcing it runs it at any size."""
    problem = Problem(device="cpu", dtype="float32", shape=(64, 64), batch=3)
    default = small_svd.choose(problem)
    if "native" not in small_svd.backends or small_svd.backends["native"].available():
        pytest.skip("native module not built")
    assert default.backend.name == "torch" and "LAPACK gesdd is faster" in default.rejected["native"]
    forced = small_svd.choose(problem, "native")
    assert forced.backend.name == "native" and forced.warning and "LAPACK gesdd is faster" in forced.warning
    X = torch.randn(3, 64, 64, dtype=torch.float64)
    U, S, Vh = forced.backend.fn(X)
    rel = float(((U * S[..., None, :]) @ Vh - X).norm() / X.norm())
    assert rel < 1e-10


@pytest.mark.parametrize("op,backend", [(truncated_svd, "gram"), (project_lora, "torch")])
def test_default_dispatch_on_cpu_is_torch(op, backend):
    assert op.choose(Problem(device="cpu", dtype="float32", shape=(640, 640), batch=4, k=300, r=16)).backend.name == backend


@pytest.mark.parametrize("family,layers", [("sdxl", 700), ("flux", 418), ("chroma", 418), ("qwen-image", 720)])
def test_bench_dry_run_plans_full_size_gpu_runs_within_16gb(family, layers, tmp_path, capsys):
    js = tmp_path / "plan.json"
    assert main(["bench", "--family", family, "--device", "cuda", "--dry-run", "--max-memory", "64GB",
                 "--max-gpu-memory", "16GB", "--dir", str(tmp_path / "none"), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    plan = json.loads(js.read_text())
    assert plan["layers"] == layers and len(plan["chunks"]) > 1
    assert sum(c["modules"] for c in plan["chunks"]) == layers
    assert 0 < plan["peak_device_bytes"] <= 16 * 2**30 / 1.5
    assert f"{len(plan['chunks'])} chunks; peak planned device memory" in text
    assert not (tmp_path / "none").exists()  # nothing written, nothing computed
