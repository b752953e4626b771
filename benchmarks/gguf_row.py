"""A FLUX.1-dev-shaped target as GGUF Q8_0 against the same transfer from safetensors: wall time
and peak RSS of `prolora transfer` (cold: --no-cache), each run in its own process.

    python benchmarks/gguf_row.py --dir DIR [--blocks 2,4] [--max-memory 4GB] [--json FILE]

Builds (once, in DIR) a synthetic FLUX.1-dev source and target (BFL single files, bf16, full width
3072, `--blocks` double,single blocks), a PEFT rank-16 LoRA on the source's transformer linears,
the target as GGUF Q8_0 (written by the `gguf` package: 2-D weights quantized, the rest F32) and
that GGUF dequantized into float32 safetensors; then times three transfers onto: the bf16 target,
the GGUF, and the dequantized GGUF (whose output must equal the GGUF's).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _build(d: Path, blocks: tuple[int, int]) -> dict[str, Path]:
    from prolora.safetensors_io import SafetensorsFile, StreamingWriter
    from prolora.synthetic import flux_config, write_lora, write_model

    cfg = flux_config("flux-dev", "full", blocks=blocks)
    d.mkdir(parents=True, exist_ok=True)
    p = {"source": d / "source.safetensors", "target": d / "target.safetensors", "lora": d / "lora_peft.safetensors",
         "gguf": d / "target-Q8_0.gguf", "dequantized": d / "target-Q8_0-dequantized.safetensors"}
    if not p["source"].exists():
        write_model(p["source"], cfg, layout="single-file", dtype=torch.bfloat16, seed=0)
    if not p["target"].exists():
        write_model(p["target"], cfg, layout="single-file", dtype=torch.bfloat16, seed=0, base=p["source"])
    if not p["lora"].exists():
        write_lora(p["source"], p["lora"], "peft", rank=16, targets="transformer")
    if not p["gguf"].exists():
        from gguf import GGMLQuantizationType, GGUFWriter
        from gguf.quants import dequantize, quantize

        q = GGMLQuantizationType.Q8_0
        w = GGUFWriter(str(p["gguf"]), "flux")
        entries = []
        with SafetensorsFile(p["target"]) as f:
            for name in f.keys():
                a = f.get(name).float().numpy()
                if a.ndim == 2 and a.shape[1] % 32 == 0:
                    data = quantize(a, q)
                    w.add_tensor(name, data, raw_dtype=q)
                    entries.append((name, a.shape, lambda data=data: torch.from_numpy(np.array(dequantize(data, q)))))
                else:
                    w.add_tensor(name, a)
                    entries.append((name, a.shape, lambda a=a: torch.from_numpy(a)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with StreamingWriter(p["dequantized"], [(n, torch.float32, s) for n, s, _ in entries]) as sw:
            for n, _, make in entries:
                sw.write(n, make().float())
    return p


def _run(args: list[str]) -> dict:
    t0 = time.perf_counter()
    # stderr to a file, not a pipe: nothing reads a pipe while wait4 waits, so a full one would hang the child
    with tempfile.TemporaryFile("w+") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "prolora.cli", *args], stdout=subprocess.DEVNULL,
                                stderr=errf, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        errf.seek(0)
        err = errf.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"prolora {' '.join(args)} failed: {err.strip()[-400:]}")
    # CPU seconds as well as wall time: on a shared machine the wall time measures the neighbours too
    return {"seconds": round(seconds, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3), "load_average": round(os.getloadavg()[0], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--blocks", default="2,4")
    ap.add_argument("--max-memory", default="4GB")
    ap.add_argument("--json")
    ap.add_argument("--build-only", action="store_true", help="write the models and the LoRA, time nothing")
    a = ap.parse_args()
    d = Path(a.dir)
    blocks = tuple(int(x) for x in a.blocks.split(","))
    p = _build(d, blocks)
    if a.build_only:
        return
    rows = {}
    for name in ("target", "gguf", "dequantized"):
        out = d / f"out-{name}.safetensors"
        rows[name] = _run(["transfer", str(p["source"]), str(p[name]), str(p["lora"]), "-o", str(out), "--overwrite",
                           "--no-cache", "--max-memory", a.max_memory, "-q", "--report", str(d / f"report-{name}.json")])
        rows[name]["bytes"] = p[name].stat().st_size
        print(name, rows[name], flush=True)
    from prolora.formats import read_lora

    ga, gb = read_lora(d / "out-gguf.safetensors"), read_lora(d / "out-dequantized.safetensors")
    worst = 0.0
    for k, m in gb.modules.items():
        want = m.scale * (m.up.double() @ m.down.double())
        got = ga.modules[k].scale * (ga.modules[k].up.double() @ ga.modules[k].down.double())
        worst = max(worst, float((got - want).norm() / want.norm()))
    result = {"blocks": blocks, "max_memory": a.max_memory, "threads": torch.get_num_threads(), "runs": rows,
              "gguf_vs_dequantized_worst_rel": worst}
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
