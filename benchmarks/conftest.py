"""Benchmarks run with `python -m pytest benchmarks --benchmark-enable` (not part of the tests)."""
import os
import tempfile

os.environ.setdefault("PROLORA_CACHE_DIR", tempfile.mkdtemp(prefix="prolora-bench-cache-"))
