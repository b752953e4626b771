"""`python -m benchmarks.quality run|tables` (from the repository root)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import Config
from .pipeline import HERE, idle_estimate, run_all
from .report import tables, update_results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    p.add_argument("command", choices=("run", "tables"), help="run: build what is missing, then the tables; "
                   "tables: the tables from the cache only")
    p.add_argument("--cache", type=Path, default=HERE / ".cache", help="artefact folder (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each (default: 2)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny steps; own cache folder)")
    p.add_argument("--no-update", action="store_true", help="do not rewrite the tables block of RESULTS.md")
    a = p.parse_args(argv)
    cfg = Config.quick() if a.quick else Config()
    cache = a.cache / "quick" if a.quick else a.cache
    cache.mkdir(parents=True, exist_ok=True)
    if a.command == "run":
        t0 = time.perf_counter()
        times = run_all(cache, cfg, jobs=a.jobs)
        total = time.perf_counter() - t0
        idle = idle_estimate(cfg, {k: c for k, (_, c) in times.items()}, a.jobs)
        print(f"pipeline: {total:.0f} s wall ({len(times)} stages run); {idle:.0f} s on {a.jobs} idle cores "
              "(the same stages, each taking its CPU time)")
        if times:
            (cache / "timings.json").write_text(json.dumps({"wall_seconds": round(total, 1), "jobs": a.jobs,
                                                            "idle_estimate_seconds": round(idle, 1),
                                                            "stages": {k: {"wall": round(w, 1), "cpu": round(c, 1)}
                                                                       for k, (w, c) in times.items()}},
                                                           indent=1))
    block = tables(cache)
    (cache / "tables.md").write_text(block + "\n")
    print(block)
    if not a.quick and not a.no_update and update_results(HERE / "RESULTS.md", block):
        print(f"updated {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
