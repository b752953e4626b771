"""Where an end-to-end bench run's time goes: seconds per phase (read, Gram, eigensolver, recover,
cache write, similarity, projection, write), bases per eigensolver path, and the CPU seconds and
load average beside the wall time (a shared machine skews every timing)."""
from __future__ import annotations

from typing import Any


def children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def phases(r: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase of one end-to-end run. Wall seconds of the main thread's phases, the
    bases' wall split into gram / eigensolver / recover in proportion to their thread-seconds (the
    bases of two layers run at once); read and cache write run in background threads, overlapping."""
    p, th = r["parts_s"], r.get("basis_phases_thread_s") or {}
    basis = p.get("basis", 0.0)
    busy = sum(th.get(k, 0.0) for k in ("gram", "eigensolver", "recover"))
    out = {"read": p.get("load", 0.0)}
    if busy:
        out.update({k: basis * th.get(k, 0.0) / busy for k in ("gram", "eigensolver", "recover")})
    else:
        out["bases (full SVD)" if r.get("solvers") else "bases (cache)"] = basis
    out.update({"cache write": p.get("cache_write", 0.0), "similarity": p.get("similarity", 0.0),
                "projection": p.get("project", 0.0), "write": p.get("write", 0.0)})
    return out


def phase_line(r: dict[str, Any]) -> str:
    solvers = ", ".join(f"{k} {v}" for k, v in (r.get("solvers") or {}).items()) or "-"
    return (" | ".join(f"{k} {v:.1f}" for k, v in phases(r).items()) + f" s; bases by solver: {solvers}"
            + (f"; {len(r['fallbacks'])} fell back to a dense eigh" if r.get("fallbacks") else "")
            + (f"; CPU {r['cpu_s']:.0f} s, load {r['loadavg_1min'][0]:.1f}-{r['loadavg_1min'][1]:.1f}" if "cpu_s" in r else ""))
