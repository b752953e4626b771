"""benchmarks/gpu_check.sh and its helpers, without a GPU: the plan fits the machine a GPU run
gets (one command of at most 10 minutes, at most 8 files back), the dry run passes with no
network (slow), outputs are compared through r x r products exactly as a dense merge would, and
issue 26's new solver is timed when prolora.ops has it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_eigh, gpu_report
from benchmarks.gpu_transfer import lowrank_gap
from prolora.lora import LoraModule
from prolora.ops import registry

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _plan(line: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"plan: (\d+) steps, (\d+) s budget, (\d+) files", line)
    assert m, line
    return tuple(int(x) for x in m.groups())


def test_gpu_check_plan_fits_one_call():
    out = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "PROLORA_GPU_PLAN_ONLY": "1"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1
    steps, seconds, files = _plan(out.stdout.strip())
    assert steps == 5 and seconds <= 420 and files <= 8


@pytest.mark.slow
def test_gpu_check_dry_run_passes_without_network(tmp_path):
    """The acceptance check: exit 0 within 300 s, one line printed, at most 8 files, with no
    network (a new network namespace where `unshare` allows one)."""
    cmd = ["bash", str(SCRIPT), "--dry-run"]
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        cmd = ["unshare", "-n", *cmd]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    t0 = time.time()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stderr, (tmp_path / "out" / "gpu_check.log").read_text()[-3000:])
    assert time.time() - t0 < 300
    _plan(out.stdout.strip())
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) == 8 and "gpu_check.json" in files and "transfer_flux.json" in files


def test_outputs_are_compared_through_small_products():
    g = torch.Generator().manual_seed(0)
    a = LoraModule("k", torch.randn(3, 50, generator=g), torch.randn(40, 3, generator=g), 1.5, None)
    b = LoraModule("k", torch.randn(5, 50, generator=g), torch.randn(40, 5, generator=g), None, None)
    dense = lambda m: m.scale * m.up.double() @ m.down.double()  # noqa: E731
    d2, n2 = lowrank_gap(a, b)
    assert d2 == pytest.approx(float((dense(a) - dense(b)).norm() ** 2), rel=1e-12)
    assert n2 == pytest.approx(float(dense(b).norm() ** 2), rel=1e-12)
    assert lowrank_gap(b, b)[0] == pytest.approx(0.0, abs=1e-9 * n2)


def test_the_new_solver_slot_times_topk_eigh():
    """Issue 26's truncated eigensolver (prolora.ops.topk_eigh, "eig" in its name): the eigh step
    times its default backend, eigh and both, and checks it against eigh."""
    import prolora.ops as ops

    assert gpu_eigh.find_new_solver() is ops.topk_eigh
    G = gpu_eigh.grams(24, 2, "cpu")
    row = gpu_eigh.new_solver_rows(G, "cpu", gpu_eigh.Budget(20))
    assert row["present"] and row["op"] == "topk_eigh" and "error" not in row, row
    assert row["max_rel_eigenvalue_error"] < 1e-5 and row["min_subspace_phi"] > 0.9999
    assert all("median_s" in row[key] for key in ("eigh", "new", "both"))
    # the other backends too: subspace warm-started from a related matrix's basis, lapack
    sub = row["others"]["subspace"]
    assert "median_s" in sub and 0 <= sub["fallbacks"] <= G.shape[0], row["others"]
    assert "lapack" in row["others"] and "reference" not in row["others"]


def test_the_new_solver_slot_takes_an_op_named_by_the_environment(monkeypatch):
    """$PROLORA_NEW_SOLVER names the op; one returning (evals, evecs) pairs is timed the same way."""
    import prolora.ops as ops

    op = registry.Op("other_eig", "top-k eigenpairs of symmetric matrices (a stand-in)")

    @op.register("torch", priority=10)
    def _topk(G, k, dtype=None):
        w, v = torch.linalg.eigh(G)
        return w[..., -k:], v[..., -k:]

    monkeypatch.setattr(ops, "other_eig", op, raising=False)
    monkeypatch.setenv(gpu_eigh.NEW_SOLVER_ENV, "other_eig")
    assert gpu_eigh.find_new_solver() is op
    G = gpu_eigh.grams(24, 2, "cpu")
    row = gpu_eigh.new_solver_rows(G, "cpu", gpu_eigh.Budget(20))
    assert row["present"] and row["op"] == "other_eig" and "error" not in row, row
    assert row["max_rel_eigenvalue_error"] < 1e-5 and row["min_subspace_phi"] > 0.9999
    assert all("median_s" in row[key] for key in ("eigh", "new", "both"))


def test_reports_fold_each_step_into_one_file(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/><testcase classname="a" name="bad">'
                   '<failure message="boom"/></testcase><testcase classname="a" name="s"><skipped message="no GPU"/>'
                   '</testcase></testsuite></testsuites>')
    res = gpu_report.tests(str(tmp_path / "tests.json"), [str(xml), str(tmp_path / "missing.xml")])
    assert (res["passed"], res["failed"], res["skipped"]) == (1, 1, 1)
    assert res["failures"][0]["message"] == "boom" and res["phases"]["missing"].startswith("did not run")
    s = gpu_report.summary(str(tmp_path / "gpu_check.json"), "plan: 5 steps, 420 s budget, 8 files",
                           "eigh=0:12:30 tests=124:80:60", time.time(), False, str(tmp_path))
    assert s["failed"] == ["tests"] and s["steps"]["tests"]["status"] == "timed out"
