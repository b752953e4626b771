"""Golden outputs: hash what a user sees from a fixed set of commands, to show that a refactor
changes nothing.

Builds tiny synthetic models of every family (seeded, deterministic), runs the CLI on them (every
method, cold and warm basis cache, several output formats, extract / resize / merge, similarity,
inspect) and prints one line per output: its sha256 and a name. Files are hashed byte for byte;
report JSONs are hashed without the fields that measure time or name temporary paths.

    python benchmarks/golden.py [--dir DIR] [--out hashes.txt]

Run it before and after a change on the same machine (one torch thread, set here) and compare
the two lists with `diff`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

_VOLATILE = ("seconds", "time", "elapsed", "peak", "path", "cache", "dir", "file", "rss", "_s", "phases")  # phases: timings


IGNORED: set[str] = set()  # report keys left out on request (--ignore), e.g. a statistic added later


def _clean(obj, root: str):
    """A report without timings and temporary paths (anything under `root` becomes relative)."""
    if isinstance(obj, dict):
        return {k: _clean(v, root) for k, v in obj.items()
                if not any(t in k.lower() for t in _VOLATILE) and k not in IGNORED}
    if isinstance(obj, list):
        return [_clean(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "<dir>")
    return obj


def _hash_file(path: Path, root: str) -> str:
    if path.suffix == ".json":
        data = _clean(json.loads(path.read_text()), root)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(*args) -> str:
    from prolora.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main([str(a) for a in args])
    if rc not in (0, None):
        raise SystemExit(f"golden: `prolora {' '.join(map(str, args))}` exited {rc}")
    return buf.getvalue()


def build(d: Path) -> dict[str, Path]:
    """The models and LoRAs every run uses (written once into `d`)."""
    from prolora.synthetic import write_lora, write_model, write_pair
    from prolora.synthetic import (write_qwen_lora, write_qwen_model, write_wan22_experts, write_wan_lora,
                                   write_wan_model)

    p: dict[str, Path] = {}
    p["sdxl_s"], p["sdxl_t"] = write_pair(d / "sdxl_s.safetensors", d / "sdxl_t", "sdxl:tiny", seed=0)
    p["sd15_s"], p["sd15_t"] = write_pair(d / "sd15_s", d / "sd15_t.safetensors", "sd15:tiny", seed=3)
    p["ssd_t"] = write_model(d / "ssd_t", "ssd-1b:tiny", seed=0, base=p["sdxl_s"])
    p["sdxl_kohya"] = write_lora(p["sdxl_s"], d / "sdxl_kohya.safetensors", format="kohya", rank=4, targets="all",
                                 conv=True)
    p["sdxl_peft"] = write_lora(p["sdxl_s"], d / "sdxl_peft.safetensors", format="peft", rank=4, targets="attn", seed=1)
    p["sdxl_kohya2"] = write_lora(p["sdxl_s"], d / "sdxl_kohya2.safetensors", format="kohya", rank=8,
                                  targets="transformer", seed=5)
    p["sd15_kohya"] = write_lora(p["sd15_s"], d / "sd15_kohya.safetensors", format="kohya", rank=4,
                                 targets="transformer")
    p["flux_s"] = write_model(d / "flux_s.safetensors", "flux-dev:tiny", layout="single-file", seed=0)
    p["flux_t"] = write_model(d / "flux_t", "flux-dev:tiny", layout="diffusers", seed=0, base=p["flux_s"],
                              shard_bytes=60_000)
    p["schnell"] = write_model(d / "schnell.safetensors", "flux-schnell:tiny", layout="single-file", seed=0)
    p["chroma"] = write_model(d / "chroma", "chroma:tiny", layout="diffusers", seed=0, base=p["schnell"])
    p["flux_kohya"] = write_lora(p["flux_s"], d / "flux_kohya.safetensors", format="kohya", rank=4, targets="all")
    p["flux_peft"] = write_lora(p["flux_s"], d / "flux_peft.safetensors", format="peft", rank=4, targets="all", seed=1)
    p["flux_xlabs"] = write_lora(p["flux_s"], d / "flux_xlabs.safetensors", format="xlabs", rank=4, seed=2)
    p["schnell_kohya"] = write_lora(p["schnell"], d / "schnell_kohya.safetensors", format="kohya", rank=4,
                                    targets="all")
    p["qwen_s"] = write_qwen_model(d / "qwen_s", seed=0)
    p["qwen_t"] = write_qwen_model(d / "qwen_t.safetensors", layout="single-file", seed=0, base=p["qwen_s"])
    p["qwen_kohya"] = write_qwen_lora(p["qwen_s"], d / "qwen_kohya.safetensors", "kohya", rank=4, targets="all")
    p["wan_s"] = write_wan_model(d / "wan_s.safetensors", layout="single-file-prefixed", seed=0)
    p["wan22"] = write_wan22_experts(d / "wan22", base=p["wan_s"], shard_bytes=20000)["pipeline"]
    p["wan_peft"] = write_wan_lora(p["wan_s"], d / "wan_peft.safetensors", "peft", rank=4)
    p["wan_kohya"] = write_wan_lora(p["wan_s"], d / "wan_kohya.safetensors", "kohya", rank=4, seed=1)
    return p


def runs(p: dict[str, Path], o: Path) -> list[tuple[str, list]]:
    """(name, CLI arguments) of every golden command; outputs go under `o`."""
    cache = ["--cache-dir", o / "cache"]
    out: list[tuple[str, list]] = []

    def t(name, src, tgt, lora, *extra, cached=False):
        args = ["transfer", p[src], p[tgt], p[lora], "-o", o / f"{name}.safetensors", "--report", o / f"{name}.json",
                "-q", *extra]
        out.append((name, args + (cache if cached else ["--no-cache"])))

    for method in ("prolora", "prolora-full", "subspace", "copy"):
        t(f"sdxl-{method}", "sdxl_s", "sdxl_t", "sdxl_kohya", "--method", method, "--tau", "0.5")
    t("sdxl-cold", "sdxl_s", "sdxl_t", "sdxl_peft", cached=True)
    t("sdxl-warm", "sdxl_s", "sdxl_t", "sdxl_peft", cached=True)
    for fmt in ("peft", "comfy", "diffusers-old"):
        t(f"sdxl-as-{fmt}", "sdxl_s", "sdxl_t", "sdxl_kohya", "--format", fmt)
    t("sdxl-rank2r-alpha", "sdxl_s", "sdxl_t", "sdxl_kohya2", "--rank", "2r", "--alpha", "rank", "--skipped", "copy")
    t("sd15", "sd15_s", "sd15_t", "sd15_kohya")
    t("ssd1b", "sdxl_s", "ssd_t", "sdxl_kohya", "--tau", "0.0")
    t("flux", "flux_s", "flux_t", "flux_kohya")
    t("flux-cold", "flux_s", "flux_t", "flux_peft", cached=True)
    t("flux-warm", "flux_s", "flux_t", "flux_peft", cached=True)
    t("flux-as-comfy", "flux_s", "flux_t", "flux_kohya", "--format", "comfy")
    t("flux-xlabs", "flux_s", "flux_t", "flux_xlabs")
    t("flux-subspace", "flux_s", "flux_t", "flux_kohya", "--method", "subspace")
    t("chroma", "schnell", "chroma", "schnell_kohya", "--tau", "0.0")
    t("qwen", "qwen_s", "qwen_t", "qwen_kohya")
    t("qwen-as-peft", "qwen_s", "qwen_t", "qwen_kohya", "--format", "peft")
    t("wan22", "wan_s", "wan22", "wan_peft")
    t("wan22-kohya", "wan_s", "wan22", "wan_kohya")
    out.append(("sdxl-similarity", ["similarity", p["sdxl_s"], p["sdxl_t"], "--json", o / "sdxl-similarity.json",
                                    "-q", "--no-cache"]))
    out.append(("flux-similarity", ["similarity", p["flux_s"], p["flux_t"], "--json", o / "flux-similarity.json",
                                    "-q", "--no-cache"]))
    out.append(("sdxl-extract", ["extract", p["sdxl_s"], p["sdxl_t"], "-o", o / "sdxl-extract.safetensors",
                                 "--rank", "4", "--backend", "exact", "--report", o / "sdxl-extract.json", "-q"]))
    out.append(("flux-extract", ["extract", p["flux_s"], p["flux_t"], "-o", o / "flux-extract.safetensors",
                                 "--rank", "4", "--backend", "exact", "--report", o / "flux-extract.json", "-q"]))
    out.append(("sdxl-resize", ["resize", p["sdxl_kohya2"], "-o", o / "sdxl-resize.safetensors", "--rank", "3",
                                "--report", o / "sdxl-resize.json", "-q"]))
    out.append(("sdxl-resize-dyn", ["resize", p["sdxl_kohya2"], "-o", o / "sdxl-resize-dyn.safetensors", "--rank", "8",
                                    "--dynamic", "sv_fro:0.9", "-q"]))
    out.append(("sdxl-merge", ["merge", p["sdxl_kohya"], p["sdxl_kohya2"], "-o", o / "sdxl-merge.safetensors",
                               "--ratios", "0.7,0.5", "--rank", "6", "--base", p["sdxl_s"], "--report",
                               o / "sdxl-merge.json", "-q"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="work folder (default: a temporary one)")
    ap.add_argument("--out", help="write the hash list here too")
    ap.add_argument("--ignore", action="append", default=[], metavar="KEY",
                    help="leave report entries named KEY out (a field added since the list was made)")
    a = ap.parse_args(argv)
    IGNORED.update(a.ignore)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with contextlib.ExitStack() as stack:
        d = Path(a.dir) if a.dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="prolora-golden-")))
        d.mkdir(parents=True, exist_ok=True)
        root = str(d.resolve())
        p = build(d / "in")
        o = d / "out"
        o.mkdir(exist_ok=True)
        lines = []
        for name, args in runs(p, o):
            text = _cli(*args)
            for f in sorted(o.glob(f"{name}*")):
                if f.is_file():
                    lines.append(f"{_hash_file(f, root)}  {f.name}")
        for key in ("sdxl_t", "flux_s", "chroma", "qwen_t", "wan22", "sdxl_kohya", "flux_xlabs", "qwen_kohya"):
            text = _cli("inspect", "--json", p[key])
            data = _clean(json.loads(text), root)
            lines.append(f"{hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()}  inspect-{key}")
        report = "\n".join(lines) + "\n"
        sys.stdout.write(report)
        if a.out:
            Path(a.out).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
