"""The Triton kernels through Triton's real compiler for sm_80 and sm_90 (no GPU needed), and the
launch-time pruning of autotune configurations by shared memory (pure functions, any limit).

The compiles run in a subprocess without TRITON_INTERPRET (the test session interprets). The
default run compiles every autotune configuration of every kernel with every operand dtype pair
it is launched with, epilogue flags in their heaviest set (prolora.kernels.aot.in_ci: 154
compiles, ~1 CPU-minute cold); `-m slow` compiles every flag set too (370 compiles, ~3.5
CPU-minutes). Each cubin is checked against its architecture's shared memory, registers per
thread and per block, for register spills (ptxas -v), and against the shared-memory estimate
that launch-time pruning relies on.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from prolora.kernels import _config, lowrank, tn as tnk  # noqa: E402
from prolora.kernels._config import ARCH_LIMITS, config_pruner, fitting, meta_of  # noqa: E402

SM86_SHARED = 101376  # the smallest opt-in shared memory of the GPUs Triton targets (sm_86/sm_89)


def _compile_in_subprocess(full: bool, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    args = [] if full else ["--ci"]
    return subprocess.run([sys.executable, "-m", "prolora.kernels.aot", *args, "80", "90"], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_compiled_within_limits(proc: subprocess.CompletedProcess, expected: int) -> None:
    out = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, out
    print(proc.stdout)
    for arch in (80, 90):
        for kernel in ("tn", "gram", "expand"):
            assert f"sm_{arch} {kernel}: " in proc.stdout, out
    counts = [int(line.split(": ")[1].split()[0]) for line in proc.stdout.splitlines() if line.startswith("sm_")]
    assert sum(counts) == 2 * expected, out


def test_every_configuration_compiles_within_sm80_and_sm90_limits():
    from prolora.kernels.aot import variants

    _assert_compiled_within_limits(_compile_in_subprocess(full=False, timeout=900), len(variants(full=False)))


@pytest.mark.slow
def test_every_dtype_pair_and_flag_set_compiles_within_limits():
    from prolora.kernels.aot import variants

    _assert_compiled_within_limits(_compile_in_subprocess(full=True, timeout=3600), len(variants()))


# ---- shared-memory pruning at launch ---------------------------------------------------------


def _cases():
    """(name, configs, shared estimate, launch args) for every kernel, operand dtype and flag
    set, as the launchers pass them (tensors stand for pointers)."""
    def t(dtype):
        return torch.empty(1, dtype=dtype)

    dts = (torch.float16, torch.bfloat16, torch.float32)
    out = []
    for da in dts:
        for dx in dts:
            up = not (da == dx and da != torch.float32)
            args = dict(a_ptr=t(da), x_ptr=t(dx), UPCAST=up)
            out.append(("tn", [c for c in tnk._TN_CONFIGS if tnk.tn_keeps(c, args)], tnk.tn_shared, args))
        args = dict(a_ptr=t(da), UPCAST=da == torch.float32)
        out.append(("gram", [c for c in tnk._GRAM_CONFIGS if tnk.gram_keeps(c, args)], tnk.gram_shared, args))
        for flags in ((False, True, False), (True, True, True)):
            has_u2, write_a, write_b = flags
            out.append(("expand", lowrank._CONFIGS, lowrank.expand_shared,
                        dict(u1=t(da), HAS_U2=has_u2, WRITE_A=write_a, WRITE_B=write_b, R=256)))
    return out


def test_fitting_keeps_what_fits_in_order():
    sizes = {"a": 10, "b": 30, "c": 20}
    assert fitting(["a", "b", "c"], sizes.get, 20) == ["a", "c"]
    assert fitting(["a", "b", "c"], sizes.get, 9) == []


@pytest.mark.parametrize("name,configs,shared,args", _cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_configuration_fits_sm80_and_one_fits_sm86(name, configs, shared, args):
    """No configuration is dead weight on an A100 or H100 (pruning there keeps them all), and a
    99 KB GPU keeps at least one, for every dtype and flag set."""
    needs = [shared(c, args) for c in configs]
    for arch in (80, 90):
        assert max(needs) <= ARCH_LIMITS[arch].max_shared, (name, needs)
    assert fitting(configs, lambda c: shared(c, args), SM86_SHARED), (name, needs)


def _triton_configs(configs):
    return [triton.Config(meta_of(c), num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs]


def test_expand_pruner_drops_wide_rank_tiles_and_what_does_not_fit():
    """The early_config_prune the autotuner calls: for r = 4 only 16-wide rank tiles; for r = 256
    every width, less those over the limit; under any limit too small, an error naming the kernel."""
    configs = _triton_configs(lowrank._CONFIGS)
    named = dict(u1=torch.empty(1, dtype=torch.float16), R=4)
    flags = dict(HAS_U2=True, HAS_X=True, WRITE_A=True, WRITE_B=True, SUM=False)

    def prune(limit, **named_args):
        p = config_pruner("expand", lowrank.expand_shared, lowrank.expand_keeps, limit_of=lambda _: limit)
        return p(configs, {**named, **named_args}, **flags)

    r4 = prune(ARCH_LIMITS[80].max_shared)
    assert r4 and all(c.kwargs["BR"] == 16 for c in r4)
    assert len(prune(ARCH_LIMITS[80].max_shared, R=256)) == len(configs)
    args = {**named, **flags}
    small = prune(SM86_SHARED, R=256)
    assert small and len(small) < len(configs)
    assert all(lowrank.expand_shared({**c.kwargs, "num_stages": c.num_stages}, args) <= SM86_SHARED for c in small)
    with pytest.raises(RuntimeError, match="expand: no configuration fits .* 1000 bytes"):
        prune(1000, R=256)


def test_tn_pruner_keeps_the_launchs_class_on_a_hopper():
    """Upcast (float32) launches autotune over the FMA configurations, half pairs over the
    tensor-core ones; on an H100/H200 all of a class fit."""
    configs = _triton_configs(tnk._TN_CONFIGS)
    p = config_pruner("tn", tnk.tn_shared, tnk.tn_keeps, limit_of=lambda _: ARCH_LIMITS[90].max_shared)
    fp32 = dict(a_ptr=torch.empty(1), x_ptr=torch.empty(1))
    fp16 = dict(a_ptr=torch.empty(1, dtype=torch.float16), x_ptr=torch.empty(1, dtype=torch.float16))
    fma = p(configs, fp32, UPCAST=True, STORE=True, SQ=False)
    mma = p(configs, fp16, UPCAST=False, STORE=True, SQ=False)
    assert [c.kwargs for c in fma] == [meta_of(c) for c in tnk._TN_FMA]
    assert [c.kwargs for c in mma] == [meta_of(c) for c in tnk._TN_MMA]


def test_interp_config_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with _config.interp_config("tn", tnk._TN_CONFIGS[0]):
            pass
    assert _config.interp_meta("tn", BP=16) == {}
