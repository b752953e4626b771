"""The small JSON files benchmarks/gpu_check.sh brings back (at most 8 come back from a GPU
machine, so each step's raw output is folded into one file the moment the step ends):

    python -m benchmarks.gpu_report tests OUT.json JUNIT.xml [...]     pass/fail/skip, failures' messages
    python -m benchmarks.gpu_report bench OUT.json BENCH.json [...]    pytest-benchmark rows, trimmed
    python -m benchmarks.gpu_report summary OUT.json --plan P --steps "name=rc:seconds:budget ..."

Standard library only: it must run even where the package does not import.
"""
from __future__ import annotations

import json
import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def _write(path: str, data: dict) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def tests(out: str, xmls: list[str]) -> dict:
    """Counts and the failures (name, message head) of junit XML files; a missing file counts as
    a phase that did not run."""
    res: dict = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skips": {}, "phases": {}}
    for x in xmls:
        p = Path(x)
        if not p.is_file():
            res["phases"][p.stem] = "did not run (no report)"
            continue
        root = ET.parse(p).getroot()
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            skip = case.find("skipped")
            if bad is not None:
                res["failed" if bad.tag == "failure" else "errors"] += 1
                res["failures"].append({"test": name, "message": (bad.get("message") or bad.text or "")[:800]})
            elif skip is not None:
                res["skipped"] += 1
                why = (skip.get("message") or "")[:200]
                res["skips"][why] = res["skips"].get(why, 0) + 1
            else:
                res["passed"] += 1
        res["phases"][p.stem] = "ran"
    _write(out, res)
    return res


def bench(out: str, inputs: list[str]) -> dict:
    """pytest-benchmark JSON files as one list of rows (name, group, median, iqr, rounds, extra)."""
    rows, machine = [], None
    for x in inputs:
        p = Path(x)
        if not p.is_file():
            continue
        data = json.loads(p.read_text())
        machine = machine or data.get("machine_info")
        for b in data.get("benchmarks", []):
            st = b.get("stats", {})
            rows.append({"name": b.get("name"), "group": b.get("group"), "median_s": st.get("median"),
                         "iqr_s": st.get("iqr"), "rounds": st.get("rounds"), **b.get("extra_info", {})})
    res = {"rows": rows, "files": [Path(x).name for x in inputs if Path(x).is_file()],
           "machine": {k: (machine or {}).get(k) for k in ("node", "processor", "cpu", "python_version")}}
    _write(out, res)
    return res


def summary(out: str, plan: str, steps: str, t0: float, dry: bool, folder: str) -> dict:
    """gpu_check.json: the plan, every step's exit status, seconds and budget, what failed, the
    files written so far (rewritten after every step)."""
    parsed = {}
    for item in steps.split():
        name, rest = item.split("=", 1)
        rc, secs, budget = rest.split(":")
        parsed[name] = {"rc": int(rc), "seconds": int(secs), "budget_s": int(budget),
                        "status": "ok" if rc == "0" else "timed out" if rc in ("124", "137") else "failed"}
    res = {"plan": plan, "dry_run": dry, "seconds": round(time.time() - t0), "steps": parsed,
           "failed": sorted(k for k, v in parsed.items() if v["rc"] != 0),
           "files": sorted(p.name for p in Path(folder).iterdir() if p.is_file() and not p.name.endswith(".tmp"))}
    w = Path(folder) / "gpu_winners.json"
    if w.is_file():
        try:
            table = json.loads(w.read_text())
            res["device"] = table.get("device")
            res["wins"] = [p for p in table.get("points", [])
                           if p.get("accurate") and p.get("speedup", 0) >= table.get("min_speedup", 1.05)]
        except ValueError:
            res["wins"] = "unreadable winners table"
    _write(out, res)
    return res


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "tests":
        tests(rest[0], rest[1:])
    elif cmd == "bench":
        bench(rest[0], rest[1:])
    elif cmd == "summary":
        import argparse

        ap = argparse.ArgumentParser()
        ap.add_argument("out")
        ap.add_argument("--plan", required=True)
        ap.add_argument("--steps", default="")
        ap.add_argument("--t0", type=float, required=True)
        ap.add_argument("--dry", action="store_true")
        ap.add_argument("--folder", required=True)
        a = ap.parse_args(rest)
        summary(a.out, a.plan, a.steps, a.t0, a.dry, a.folder)
    else:
        print(f"unknown command {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
