"""Two budgets: --max-gpu-memory bounds what a GPU chunk holds on the device, --max-memory the
host, and a GPU chunk does not charge the host (its weights pass through a bounded pinned
staging ring, engine/device.py). With --max-gpu-memory 16GB and the default host budget (the
bench's 2GB) the full-size plans are few, large chunks: SDXL at most 8, Flux at most 40 (the
host budget cut them to 63 and 304 before), each under 16 GB of device memory."""
from __future__ import annotations

import pytest

from prolora.bench import BenchConfig, device_plan
from prolora.engine.device import SLOT_BYTES, pending_bytes, staging_bytes
from prolora.engine.planner import IN_FLIGHT, chunk_limit
from prolora.options import parse_size


@pytest.mark.parametrize("family,most", [("sdxl", 8), ("flux", 40)])
def test_full_size_gpu_plans_at_the_default_host_budget(family, most):
    cfg = BenchConfig(family=family)
    assert parse_size(cfg.max_memory) == 2 * 10**9  # the default host budget of `prolora bench`
    plan = device_plan(cfg, parse_size("16GB"))
    assert 1 < len(plan["chunks"]) <= most
    assert plan["peak_device_bytes"] < 16 * 10**9 / IN_FLIGHT  # with the next chunk in flight: < 16 GB


def test_the_device_budget_is_not_charged_to_the_host():
    gpu = chunk_limit(host_budget=2 << 30, host_resident=1 << 30, device_budget=16 << 30)
    assert gpu == (16 << 30) / IN_FLIGHT  # neither the host budget nor what the host holds shrinks it
    assert chunk_limit(2 << 30, 1 << 30, None) == (1 << 30) / IN_FLIGHT  # the CPU path as before
    # what a GPU run holds on the host instead: a bounded ring and bounded writes in flight
    for budget in (1 << 30, 2 << 30, 64 << 30):
        assert 2 * SLOT_BYTES <= staging_bytes(budget) <= max(2 * SLOT_BYTES, budget // 8)
        assert staging_bytes(budget) + pending_bytes(budget) <= budget // 2 + (64 << 20)
