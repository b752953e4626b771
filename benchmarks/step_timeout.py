"""A pytest plugin for benchmarks/gpu_check.sh: a per-test time limit without pytest-timeout
(`-p benchmarks.step_timeout`, limit in $PROLORA_TEST_TIMEOUT seconds, default 60). A test past
its limit fails with TimeoutError and the run goes on to the next one; a call stuck in native
code is interrupted only when it returns to Python (the step's own timeout bounds that)."""
from __future__ import annotations

import os
import signal

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = float(os.environ.get("PROLORA_TEST_TIMEOUT", "60"))
    if limit <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid}: over the {limit:g} s limit of a test (PROLORA_TEST_TIMEOUT)")

    before = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
