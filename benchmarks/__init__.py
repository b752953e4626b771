"""prolora's benchmarks: pytest-benchmark suites (bench_*.py, run with `python -m pytest benchmarks
--benchmark-enable`) and the quality benchmark (`python -m benchmarks.quality`).

A package so that the tests import what they check of it (e.g. bench_kernels.winners, the quality
pipeline) by name, from the repository root that pytest puts on sys.path (pyproject's
`pythonpath`), and `python -m benchmarks.quality` runs from that root.
"""
