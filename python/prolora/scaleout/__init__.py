"""Scale-out migration of many LoRAs over a Ray cluster (`prolora migrate`).

The driver builds (or finds) every basis the LoRAs need in the basis cache once, shares the cache
with the workers (a folder every node sees, or shipped through Ray's object store), and fans the
LoRAs out in batches to worker actors that run transfer_many. A manifest in the output folder
makes the job restartable and its outputs exactly-once; a JSON report lists what failed and why.

Ray is optional (`pip install 'prolora[ray]'`); only migrate() imports it, on demand.
"""
from __future__ import annotations

import copy
import glob
import importlib
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import OptionError, OutputPathError, ProloraError
from .manifest import (DONE, FAILED, MANIFEST_NAME, PENDING, REPORT_NAME, Entry, Manifest, hash_files,
                       options_key)

PathLike = str | os.PathLike

INSTALL_HINT = ("Ray is not installed: `pip install 'prolora[ray]'` to run `prolora migrate`; on one machine, "
                "`prolora transfer SOURCE TARGET --lora-dir DIR -o OUTDIR` is the batch mode without Ray")


class RayUnavailableError(ProloraError):
    """Ray is needed (prolora migrate) but not installed."""


def require_ray() -> Any:
    """The ray module, or a one-line RayUnavailableError that says how to get it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise RayUnavailableError(INSTALL_HINT) from None


@dataclass
class MigrateResult:
    written: list[str]  # output file names written by this run
    skipped: list[str]  # complete from an earlier run (manifest entry verified)
    failed: dict[str, str]  # LoRA file name -> why
    report: dict[str, Any]
    manifest: Path
    report_path: Path


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One migration at a time per output folder (released by the OS if the driver dies)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    with open(folder / ".prolora-migrate.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputPathError(f"{folder}: another prolora migrate is writing to this folder") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_temps(out_dir: Path, names: list[str]) -> None:
    """Temporary files a killed writer left for our outputs (complete outputs are renamed in place)."""
    for name in names:
        for tmp in out_dir.glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _inputs(loras: list[PathLike], out_dir: Path) -> dict[str, Path]:
    """Output file name -> absolute input path; names must be unique and never land on an input."""
    inputs: dict[str, Path] = {}
    for p in map(Path, loras):
        if p.name in inputs:
            raise OptionError(f"{p} and {inputs[p.name]} have the same file name; outputs would collide")
        if p.parent.resolve() == out_dir.resolve():
            raise OptionError(f"{out_dir}: is the folder of input {p.name}; choose another output folder")
        inputs[p.name] = p.absolute()
    return inputs


class _Job:
    """The driver's bookkeeping for one run: manifest, counts, progress (a fan_out Sink)."""

    def __init__(self, manifest: Manifest, out_dir: Path, key: str, total: int, progress: bool,
                 on_result: Callable[[str, Entry], None] | None):
        self.manifest, self.out_dir, self.key = manifest, out_dir, key
        self.written: list[str] = []
        self.failures: dict[str, str] = {}
        self.retries: list[dict[str, Any]] = []
        self.worker_stats: dict[str, float] = {}
        self.on_result = on_result
        self.t0 = time.perf_counter()
        self.saved = 0.0
        self.bar = None
        if progress and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="migrate", unit="lora", file=sys.stderr, dynamic_ncols=True)

    def _finish(self, name: str, entry: Entry) -> None:
        if self.bar is not None:
            self.bar.update(1)
            rate = len(self.written) / max(time.perf_counter() - self.t0, 1e-9) * 60
            self.bar.set_postfix_str(f"ok {len(self.written)} failed {len(self.failures)} {rate:.1f}/min")
        if self.on_result:
            self.on_result(name, entry)

    def done(self, r: dict, worker: str, attempts: int) -> None:
        e = self.manifest.entries[r["name"]]
        if e.status != PENDING:  # a late duplicate cannot happen, but is harmless: same bytes
            return
        e.status, e.input_sha256, e.output, e.output_sha256 = DONE, r["input_sha256"], r["output"], r["output_sha256"]
        e.worker, e.attempts, e.error, e.updated = worker, attempts, None, time.time()
        self.written.append(r["name"])
        self._finish(r["name"], e)

    def failed(self, name: str, error: str, attempts: int) -> None:
        e = self.manifest.entries[name]
        if e.status != PENDING:
            return
        e.status, e.error, e.attempts, e.updated = FAILED, error, attempts, time.time()
        e.output = e.output_sha256 = None
        (self.out_dir / name).unlink(missing_ok=True)  # ours (recorded pending): no stale output stays
        self.failures[name] = error
        self._finish(name, e)

    def batch_done(self, stats: dict) -> None:
        for k, v in {**stats["seconds"], "bytes_read": stats["bytes_read"]}.items():
            self.worker_stats[k] = self.worker_stats.get(k, 0) + v

    def retry(self, names: list[str], reason: str) -> None:
        self.retries.append({"loras": list(names), "reason": reason})

    def tick(self) -> None:
        if time.perf_counter() - self.saved > 2.0:
            self.save()

    def save(self) -> None:
        self.manifest.save()
        self.saved = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plan(manifest: Manifest, inputs: dict[str, Path], out_dir: Path, key: str, overwrite: bool
          ) -> tuple[list[str], list[str], dict[str, str]]:
    """(complete, to do, refused) LoRA names: complete when the manifest entry verifies; refused
    when an output that the manifest does not know is in the way and `overwrite` is off."""
    recorded = [n for n in inputs if n in manifest.entries and manifest.entries[n].status == DONE]
    in_sha = hash_files([inputs[n] for n in recorded])
    out_sha = hash_files([out_dir / (manifest.entries[n].output or n) for n in recorded])
    complete, todo, refused = [], [], {}
    for n, p in inputs.items():
        if n in recorded and manifest.complete(n, in_sha[p], key, out_sha[out_dir / (manifest.entries[n].output or n)]):
            complete.append(n)
        elif (out_dir / n).exists() and n not in manifest.entries and not overwrite:
            refused[n] = f"{out_dir / n}: already exists and is not in {MANIFEST_NAME}; pass --overwrite to replace it"
        else:
            todo.append(n)
    return complete, todo, refused


def _worker_options(opts, device: str, cache_dir: str | None):
    """The options workers run with: their device, and the cache folder they read."""
    w = copy.copy(opts)  # not dataclasses.replace: a driver without CUDA must not validate "cuda"
    w.device, w.cache_dir = device, cache_dir
    return w


def migrate(source: PathLike, target: PathLike, loras: list[PathLike], output_dir: PathLike, options=None, *,
            address: str | None = None, workers: int | None = None, cpus_per_worker: float = 1,
            device: str | None = None, batch_size: int = 8, max_attempts: int = 3, ship_cache: bool = False,
            worker_cache_dir: str | None = None, overwrite: bool = False, report: PathLike | None = None,
            progress: bool = False, on_result: Callable[[str, Entry], None] | None = None,
            **option_kwargs: Any) -> MigrateResult:
    """Transfer `loras` from `source` to `target` into `output_dir` on a Ray cluster.

    address: Ray address, "auto", "local" or None (Ray's default); an already initialised Ray is
    used as is. device: the workers' device ("cuda": one actor per GPU; default: the options').
    ship_cache: send the driver's cache entries to the workers through the object store (no shared
    cache folder needed; they land in `worker_cache_dir` or each worker's default cache folder).
    Every LoRA ends written (recorded in the manifest with input and output hashes) or failed
    (in the report); a rerun skips what is complete.
    """
    from ..transfers import make_options
    from ..cache import BasisCache
    from .prepare import WarmStats, model_ids, warm_cache

    require_ray()
    opts = copy.copy(make_options(options, option_kwargs))  # cache_dir is made absolute below
    if batch_size < 1 or max_attempts < 1 or (workers is not None and workers < 1) or cpus_per_worker <= 0:
        raise OptionError("batch size, attempts, workers and CPUs per worker must be positive")
    if not loras:
        raise OptionError("no LoRA given: name LoRA files or --lora-dir DIR")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = _inputs(loras, out_dir)
    report_path = Path(report) if report else out_dir / REPORT_NAME
    device = device or opts.device
    t0 = time.perf_counter()
    with ExitStack() as stack:
        stack.enter_context(_locked(out_dir))
        _remove_stale_temps(out_dir, list(inputs))
        stack.callback(_remove_stale_temps, out_dir, list(inputs))  # after the workers: a crash mid-write
        opts.cache_dir = str(BasisCache(opts.cache_dir).root.absolute())
        source_id, target_id = model_ids(source, target)
        described = {**opts.describe(), "format": opts.format, "backends": dict(sorted(opts.backends.items())),
                     "source_id": source_id, "target_id": target_id}
        key = options_key(described)
        manifest = Manifest.load(out_dir / MANIFEST_NAME)
        manifest.header = {"source": str(source), "target": str(target), "options": described, "options_key": key}
        complete, todo, refused = _plan(manifest, inputs, out_dir, key, overwrite)
        t_ray = time.perf_counter()
        if todo:  # before the long bases pass, so that a wrong address fails at once
            from . import driver

            if driver.connect(address):
                stack.callback(driver.shutdown)
        t_ray = time.perf_counter() - t_ray
        warm = WarmStats()
        if todo:
            with ExitStack() as bars:  # closed before the LoRA bar starts
                warm = warm_cache(source, target, [inputs[n] for n in todo], opts,
                                  _bar_factory(bars) if progress else None)
        for n in todo:  # write-ahead: these outputs are ours from now on
            manifest.entries[n] = Entry(str(inputs[n]), PENDING, key)
        manifest.save()
        job = _Job(manifest, out_dir, key, len(todo), progress, on_result)
        stack.callback(job.close)
        stack.callback(job.save)
        t1 = time.perf_counter()
        nworkers = 0
        if todo:
            nworkers = _run_on_ray(job, source, target, out_dir, opts, inputs, todo, stack, address=address,
                                   workers=workers, cpus=cpus_per_worker, device=device, batch_size=batch_size,
                                   max_attempts=max_attempts, ship_cache=ship_cache,
                                   worker_cache_dir=worker_cache_dir)
        t2 = time.perf_counter()
    failed = {**refused, **job.failures}
    summary = {
        "loras": len(inputs), "written": len(job.written), "skipped": len(complete), "failed": len(failed),
        "workers": nworkers, "batch_size": batch_size, "retried_batches": len(job.retries),
        "seconds": {"ray_connect": round(t_ray, 3), "cache": warm.seconds.get("total", 0.0), "transfer": round(t2 - t1, 3),
                    "total": round(time.perf_counter() - t0, 3)},
        "loras_per_minute": round(len(job.written) / max(t2 - t1, 1e-9) * 60, 2) if job.written else 0.0,
    }
    warnings = []
    if job.worker_stats.get("bytes_read", 0) > 0:
        warnings.append(f"workers read {job.worker_stats['bytes_read'] / 2**20:.1f} MiB of base weights: they did "
                        "not find the driver's bases; give --cache-dir a folder every node sees, or --ship-cache")
    data = {"summary": summary, "bases": asdict(warm), "workers": {k: round(v, 3) for k, v in job.worker_stats.items()},
            "options": described, "failures": [{"lora": n, "error": e} for n, e in sorted(failed.items())],
            "retries": job.retries, "warnings": warnings, "manifest": str(manifest.path)}
    _write_json(report_path, data)
    return MigrateResult(job.written, complete, failed, data, manifest.path, report_path)


def _run_on_ray(job: _Job, source, target, out_dir: Path, opts, inputs: dict[str, Path], todo: list[str],
                stack: ExitStack, *, address, workers, cpus, device, batch_size, max_attempts, ship_cache,
                worker_cache_dir) -> int:
    """Fan `todo` out over Ray workers; returns how many workers ran."""
    from . import driver
    from .worker import pack_cache

    res = driver.cluster_resources()
    gpus = 1 if device.startswith("cuda") else 0
    if gpus and not workers and res.get("GPU", 0) < 1:
        raise OptionError(f"--device {device}: the Ray cluster has no GPU (or pass --workers N to wait for them)")
    n = workers or (int(res.get("GPU", 0)) if gpus else max(1, int(res.get("CPU", 1) // cpus)))
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    n = min(n, len(batches))
    shipped = None
    wcache = worker_cache_dir or (None if ship_cache else opts.cache_dir)
    if ship_cache:
        from ..cache import BasisCache

        ids = job.manifest.header["options"]
        shipped = driver.put(pack_cache(BasisCache(opts.cache_dir).root, [ids["source_id"], ids["target_id"]]))
    init = (str(Path(source).absolute()), str(Path(target).absolute()), str(out_dir.absolute()),
            _worker_options(opts, device, wcache), shipped)
    pool = driver.Pool(n, init, cpus=cpus, gpus=gpus, threads=None if gpus else max(1, int(cpus)))
    stack.callback(pool.close)
    driver.fan_out(pool, batches, {k: str(v) for k, v in inputs.items()}, max_attempts, job)
    return n


def _bar_factory(stack: ExitStack):
    from tqdm import tqdm

    def factory(total: int, desc: str):
        bar = stack.enter_context(tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, leave=False,
                                       dynamic_ncols=True))
        return bar.update
    return factory


def _write_json(path: Path, data: dict) -> None:
    import json

    from ..safetensors_io import atomic_path

    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    except OSError as e:
        raise OutputPathError(f"{path}: cannot write: {e.strerror or e}") from None


__all__ = ["migrate", "MigrateResult", "RayUnavailableError", "require_ray", "INSTALL_HINT"]
