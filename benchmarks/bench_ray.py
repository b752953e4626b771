"""`prolora migrate` on a local Ray cluster: LoRAs per minute with 1 vs 2 workers on the same
batch, and the share of the time spent building the basis cache (on the driver) vs transferring
(projecting, on the workers). The single-machine batch mode (transfer_many) is the baseline row.

    PYTHONPATH=python python benchmarks/bench_ray.py [--loras 16] [--model sdxl:tiny] [--cpus 2]

Each row starts from an empty basis cache, so each pays for its bases once. Ray starts once,
before the rows; a row's transfer time includes starting its worker actors. Workers run one torch
thread per CPU; the driver and the baseline run on one thread too (on a shared 2-core machine,
two torch threads were several times slower than one). Also collected by
`pytest benchmarks -m slow` (skipped without Ray).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest


def make_inputs(folder: Path, model: str, loras: int, rank: int) -> tuple[Path, Path, list[Path]]:
    from prolora.synthetic import write_lora, write_pair

    src, tgt = write_pair(folder / "source.safetensors", folder / "target.safetensors", model, seed=0)
    (folder / "loras").mkdir()
    paths = [write_lora(src, folder / "loras" / f"lora{i:03d}.safetensors", format="kohya" if i % 2 else "peft",
                        rank=rank, seed=i, targets="attn") for i in range(loras)]
    return src, tgt, paths


def baseline(src: Path, tgt: Path, paths: list[Path], folder: Path) -> dict:
    """transfer_many on one thread (what one CPU worker gets), from an empty cache."""
    from prolora.api import transfer_many

    out = folder / "out-batch"
    out.mkdir()
    t0 = time.perf_counter()
    res = transfer_many(src, tgt, paths, out, cache_dir=str(folder / "cache-batch"))
    wall = time.perf_counter() - t0
    sec = res.stats.seconds
    bases = sec.get("basis", 0) + sec.get("load", 0)
    return {"mode": "transfer_many", "workers": 1, "bases": bases, "transfer": wall - bases,
            "project": sec.get("project", 0), "wall": wall, "written": len(res.results)}


def ray_row(src: Path, tgt: Path, paths: list[Path], folder: Path, workers: int, batch: int) -> dict:
    from prolora.scaleout import migrate

    t0 = time.perf_counter()
    res = migrate(src, tgt, paths, folder / f"out-ray{workers}", cache_dir=str(folder / f"cache-ray{workers}"),
                  workers=workers, batch_size=batch)
    wall = time.perf_counter() - t0
    s = res.report["summary"]
    assert s["written"] == len(paths), res.failed
    return {"mode": "migrate (ray)", "workers": workers, "bases": s["seconds"]["cache"],
            "transfer": s["seconds"]["transfer"], "project": res.report["workers"].get("project", 0.0),
            "wall": wall, "written": s["written"]}


def table(rows: list[dict]) -> str:
    """bases: the basis pass (driver); transfer: after it, to the last output (workers' start
    included); project: projection time summed over workers; rates per minute of wall / transfer."""
    head = (f"{'mode':<14} {'workers':>7} {'LoRAs':>5} {'bases s':>8} {'transfer s':>10} {'project s':>9} "
            f"{'wall s':>7} {'LoRAs/min':>9} {'(transfer)':>10} {'bases share':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        n = r["written"]
        share = r["bases"] / max(r["bases"] + r["transfer"], 1e-9)
        lines.append(f"{r['mode']:<14} {r['workers']:>7} {n:>5} {r['bases']:>8.1f} {r['transfer']:>10.1f} "
                     f"{r['project']:>9.1f} {r['wall']:>7.1f} {n / r['wall'] * 60:>9.1f} "
                     f"{n / max(r['transfer'], 1e-9) * 60:>10.1f} {share:>11.0%}")
    return "\n".join(lines)


def run(model: str = "sdxl:tiny", loras: int = 16, rank: int = 8, cpus: int = 2, batch: int = 4) -> str:
    import ray
    import torch

    folder = Path(tempfile.mkdtemp(prefix="prolora-bench-ray-"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the driver's bases pass and the baseline: one thread, as each CPU worker
    try:
        src, tgt, paths = make_inputs(folder, model, loras, rank)
        rows = [baseline(src, tgt, paths, folder)]
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            rows += [ray_row(src, tgt, paths, folder, w, batch) for w in (1, 2)]
        finally:
            ray.shutdown()
        return table(rows)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_bench_ray():
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'prolora[ray]'")
    print("\n" + run(loras=8))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sdxl:tiny")
    ap.add_argument("--loras", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--batch-size", type=int, default=4)
    a = ap.parse_args()
    print(run(a.model, a.loras, a.rank, a.cpus, a.batch_size))
    sys.exit(0)
