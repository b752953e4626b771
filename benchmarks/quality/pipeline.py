"""The benchmark as cached stages run by a small process pool.

    classifiers                         source
                     /            /           |            \\
             finetune     finetune-mix   lora-source-0    pruned
           (each target: lora-<target>-0 and -1, the oracle and the second oracle)
             eval-source, eval-finetune, eval-finetune-mix, eval-pruned

Each stage writes into its own folder under the cache and a `stage.json` holding its key (a hash
of its settings, of its inputs' keys, of the benchmark modules it runs and, for the evaluations,
of the prolora sources). A stage whose folder holds a matching key is not run again.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import torch

import prolora

from . import stages as impl
from .config import TARGETS, Config

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...]
    settings: tuple[tuple[str, Any], ...]  # what the stage's output depends on besides its inputs
    library: bool = False  # the output depends on the prolora sources too


def stages(cfg: Config) -> list[Stage]:
    c = cfg
    lora = (("steps", c.lora_steps), ("rank", c.lora_rank))
    ev = (("n_func", c.n_func), ("n_samples", c.n_samples), ("sample_steps", c.sample_steps))
    out = [
        Stage("source", (), (("steps", c.source_steps),)),  # first: it is the critical path
        Stage("classifiers", (), (("steps", c.classifier_steps),)),
        Stage("finetune", ("source",), (("steps", c.finetune_steps),)),
        Stage("finetune-mix", ("source",), (("steps", c.finetune_steps), ("mix", True))),
        Stage("pruned", ("source",), (("steps", c.distill_steps),)),
        Stage("lora-source-0", ("source",), lora + (("seed", 0),)),
    ]
    for t in TARGETS:
        out += [Stage(f"lora-{t}-{s}", (t,), lora + (("seed", s),)) for s in (0, 1)]
    out.append(Stage("eval-source", ("source", "classifiers", "lora-source-0"), ev))
    for t in TARGETS:
        out.append(Stage(f"eval-{t}", ("source", t, "classifiers", "lora-source-0", f"lora-{t}-0", f"lora-{t}-1"),
                         ev, library=True))
    return out


# the benchmark modules whose code decides a stage's output
TRAIN_CODE = ("data.py", "models.py", "train.py", "stages.py")
EVAL_CODE = TRAIN_CODE + ("evaluate.py", "sweep.py", "figures.py")


def code_digest(files: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + (HERE / name).read_bytes())
    return h.hexdigest()[:16]


def library_digest() -> str:
    """Hash of the prolora package's Python sources (transfers depend on them)."""
    h = hashlib.sha256()
    root = Path(prolora.__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def stage_keys(cfg: Config, lib: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    train, ev = code_digest(TRAIN_CODE), code_digest(EVAL_CODE)
    for st in stages(cfg):
        code = ev if st.name.startswith("eval-") else train
        blob = json.dumps([st.name, st.settings, [keys[d] for d in st.deps], code, lib if st.library else None])
        keys[st.name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return keys


def is_done(folder: Path, key: str) -> bool:
    try:
        return json.loads((folder / "stage.json").read_text())["key"] == key
    except (OSError, ValueError, KeyError):
        return False


def _worker(name: str, cache: str, cfg: dict, key: str) -> tuple[str, float, float]:
    """Run one stage in a fresh single-threaded process; mark it done. Returns (name, wall seconds,
    CPU seconds): on a busy machine the CPU time is what the stage would take on an idle core."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0, c0 = time.perf_counter(), time.process_time()
    folder = Path(cache) / name
    folder.mkdir(parents=True, exist_ok=True)
    info = impl.run(name, Path(cache), Config(**cfg)) or {}
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    (folder / "stage.json").write_text(json.dumps({"key": key, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                                                   **info}, indent=1))
    return name, seconds, cpu


def run_all(cache: Path, cfg: Config, jobs: int = 2,
            log: Callable[[str], None] = print) -> dict[str, tuple[float, float]]:
    """Run every stage whose output is missing or stale, `jobs` at a time; returns stage -> (wall, CPU) seconds."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    keys = stage_keys(cfg, library_digest())
    todo = {st.name: st for st in stages(cfg) if not is_done(cache / st.name, keys[st.name])}
    done = {st.name for st in stages(cfg)} - set(todo)
    for name in sorted(done):
        log(f"  cached  {name}")
    times: dict[str, tuple[float, float]] = {}
    running: dict[Future, str] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        while todo or running:
            for name, st in list(todo.items()):
                if len(running) < jobs and all(d in done for d in st.deps):
                    log(f"  start   {name}")
                    running[pool.submit(_worker, name, str(cache), asdict(cfg), keys[name])] = name
                    del todo[name]
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                name, seconds, cpu = fut.result()
                del running[fut]
                done.add(name)
                times[name] = (seconds, cpu)
                log(f"  done    {name} ({seconds:.0f} s wall, {cpu:.0f} s CPU)")
    return times


def idle_estimate(cfg: Config, cpu: dict[str, float], jobs: int = 2) -> float:
    """Wall time the run would take on `jobs` idle cores: the scheduler of run_all replayed with
    each stage taking its measured CPU time (stages missing from `cpu` count as 0)."""
    todo = list(stages(cfg))
    clock, running, finished = 0.0, [], set()  # running: (end time, name)
    while todo or running:
        for st in list(todo):
            if len(running) < jobs and all(d in finished for d in st.deps):
                running.append((clock + cpu.get(st.name, 0.0), st.name))
                todo.remove(st)
        running.sort()
        clock, name = running.pop(0)
        finished.add(name)
    return clock
