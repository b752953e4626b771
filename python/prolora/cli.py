"""Command line: argument parsing, progress, output and exit codes. No math lives here."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from .version import __version__
from .errors import OptionError, OutputPathError, ProloraError
from .jobs.cli import register as register_jobs
from .lora import FORMATS
from .ops.projection import METHODS
from .options import DEFAULT_METHOD, DEFAULT_SUBSPACE, DEFAULT_TAU


def _progress_factory(quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    bars = []

    def factory(total: int, desc: str):
        for b in bars:  # stages run one after another (matching, then each pass): one bar at a time
            b.close()
        bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, leave=False, dynamic_ncols=True)
        bars.append(bar)
        return bar.update

    factory.close = lambda: [b.close() for b in bars]  # type: ignore[attr-defined]
    factory.write = lambda line, file=None: tqdm.write(line, file=file)  # type: ignore[attr-defined]
    return factory


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subspace", default=DEFAULT_SUBSPACE, metavar="MODE",
                   help="how k is chosen per layer: energy:F, ratio:F or rank:K (default %(default)s)")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU,
                   help="transfer a layer only if min(phi_left, phi_right) >= tau (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--backend", default=None, metavar="SPEC",
                   help="force backends: NAME or op=NAME,... (e.g. reference: the float64 full-SVD path; "
                        "also PROLORA_BACKEND); see `prolora backends`")
    p.add_argument("--max-memory", metavar="SIZE", help="host memory budget for weights in flight, e.g. 2GB")
    p.add_argument("--max-gpu-memory", metavar="SIZE", help="GPU memory budget, e.g. 16GB")
    p.add_argument("--cache-dir", metavar="DIR", help="basis cache folder (default $PROLORA_CACHE_DIR or ~/.cache/prolora)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the basis cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prolora", description="Zero-shot LoRA transfer between diffusion base models (ProLoRA).")
    ap.add_argument("--version", action="version", version=f"prolora {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("transfer", help="move LoRAs from SOURCE_BASE to TARGET_BASE")
    t.add_argument("source", metavar="SOURCE_BASE", help="diffusers folder or .safetensors checkpoint the LoRA was trained on")
    t.add_argument("target", metavar="TARGET_BASE", help="diffusers folder or .safetensors checkpoint to move it to")
    t.add_argument("loras", metavar="LORA", nargs="*",
                   help="LoRA .safetensors files (kohya, diffusers/PEFT, old diffusers, ComfyUI)")
    t.add_argument("--lora-dir", metavar="DIR", help="also every .safetensors LoRA in DIR")
    t.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output .safetensors file, or a folder (required for several LoRAs; created if missing)")
    t.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="(default %(default)s)")
    t.add_argument("--rank", default="same", help="output rank: same (input rank), 2r (exact), or N (default %(default)s)")
    t.add_argument("--format", choices=("same",) + FORMATS, default="same", help="output format (default: as the input)")
    t.add_argument("--alpha", choices=("keep", "rank"), default="keep",
                   help="keep the input's alpha/r convention, or write alpha = rank (default %(default)s)")
    t.add_argument("--skipped", choices=("drop", "copy"), default="drop",
                   help="layers below tau: drop their adapter or copy it unchanged (default %(default)s)")
    t.add_argument("--match", choices=("auto", "name", "similarity"), default="auto",
                   help="layer matching: by name, by subspace similarity (targets with fewer blocks, e.g. "
                        "SSD-1B), or auto: similarity where depths differ (default %(default)s)")
    t.add_argument("--widths", choices=("refuse", "lstsq"), default="refuse",
                   help="a target weight of another shape: skip it, or map the LoRA by LoRA-X's least-squares "
                        "map, refused where the subspaces disagree on the shared channels (default %(default)s)")
    t.add_argument("--target-2", metavar="TARGET_2", default=None,
                   help="a second expert (Wan 2.2 A14B split files: TARGET_BASE the high-noise, TARGET_2 the "
                        "low-noise expert): one output per expert, OUT.high_noise / OUT.low_noise.safetensors "
                        "(a Wan 2.2 folder with transformer/ and transformer_2/ does this by itself)")
    t.add_argument("--report", metavar="FILE", help="write the per-layer report(s) as JSON")
    t.add_argument("--plot", metavar="FILE.png", help="write a per-block heatmap of phi and of what was transferred")
    t.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never an input)")
    _add_common(t)
    from .refine.cli import add_refine_arguments, add_refine_command

    add_refine_arguments(t, default_steps=0)
    add_refine_command(sub)

    s = sub.add_parser("similarity", help="per-layer subspace similarity of two base models")
    s.add_argument("source", metavar="SOURCE_BASE")
    s.add_argument("target", metavar="TARGET_BASE")
    s.add_argument("--layers", metavar="REGEX", help="only modules whose canonical name matches (e.g. 'attn')")
    s.add_argument("--json", metavar="FILE", help="write the per-layer report as JSON")
    s.add_argument("--plot", metavar="FILE.png", help="write a figure of phi per layer")
    _add_common(s)

    cp = sub.add_parser("compare", help="agreement of two LoRAs for the same base (cosine, error, energy)")
    cp.add_argument("lora_a", metavar="LORA_A")
    cp.add_argument("lora_b", metavar="LORA_B", help="the reference (e.g. a LoRA trained on the target)")
    cp.add_argument("--base", metavar="MODEL", help="match module names through this model (formats may differ)")
    cp.add_argument("--json", metavar="FILE", help="write per-layer figures as JSON")
    cp.add_argument("--rows", type=int, default=30, help="table rows to print (default %(default)s)")

    i = sub.add_parser("inspect", help="describe a LoRA file or a base model")
    i.add_argument("path", metavar="FILE")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")

    c = sub.add_parser("cache", help="manage the on-disk basis cache")
    csub = c.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    cb = csub.add_parser("build", help="compute and store the bases of a model's layers")
    cb.add_argument("model", metavar="MODEL")
    cb.add_argument("--layers", metavar="REGEX", help="only modules whose canonical name matches")
    cb.add_argument("--subspace", default=DEFAULT_SUBSPACE, metavar="MODE",
                    help="how many vectors to store per layer (default %(default)s, as transfer; energy:1.0 = all)")
    cb.add_argument("--backend", default=None, metavar="SPEC")
    cb.add_argument("--device", default="cpu")
    cb.add_argument("--max-memory", metavar="SIZE")
    cb.add_argument("--cache-dir", metavar="DIR")
    cb.add_argument("-q", "--quiet", action="store_true")
    cl = csub.add_parser("ls", help="list cached models")
    cl.add_argument("--cache-dir", metavar="DIR")
    cr = csub.add_parser("rm", help="remove cached bases")
    cr.add_argument("model", nargs="?", metavar="ID_OR_NAME", help="a model id prefix or name (default: everything)")
    cr.add_argument("--cache-dir", metavar="DIR")

    sub.add_parser("backends", help="list every op's backends, available or not, and why")

    b = sub.add_parser("bench", help="measure the reference and the fast path side by side on synthetic models")
    b.add_argument("--family", default="sdxl", choices=("sd15", "sdxl", "ssd-1b", "flux", "chroma", "qwen-image"),
                   help="model shape (flux: FLUX.1-dev, bf16; chroma: a FLUX.1-schnell source and a Chroma "
                        "target derived from it, bf16; qwen-image: Qwen-Image -> Qwen-Image-Edit, bf16; "
                        "default %(default)s)")
    b.add_argument("--width", type=float, default=1.0, help="channel scale (1.0: real layer shapes)")
    b.add_argument("--depth", type=float, default=1.0, help="transformer-block scale (1.0: every block)")
    b.add_argument("--dir", default="prolora-bench", help="where models, LoRAs and the cache go (reused)")
    b.add_argument("--loras", type=int, default=8, help="LoRAs in the warm-cache batch (default %(default)s)")
    b.add_argument("--rank", type=int, default=16)
    b.add_argument("--subspace", default=DEFAULT_SUBSPACE)
    b.add_argument("--max-memory", default="2GB")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--skip-reference", action="store_true", help="skip the slow full-SVD end-to-end run")
    b.add_argument("--no-cache", action="store_true",
                   help="cold run only, storing no bases (a full-size Flux pair's bases take tens of GB)")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    b.add_argument("--max-gpu-memory", default="16GB", metavar="SIZE", help="with --device cuda (default %(default)s)")
    b.add_argument("--dry-run", action="store_true",
                   help="with --device cuda: print the chunk plan and the device memory of each chunk of a cold "
                        "transfer at this size, from the layer shapes alone (no files, nothing computed)")

    d = sub.add_parser("demo", help="generate a tiny SDXL-shaped pair and a LoRA, transfer it, print the report")
    d.add_argument("--dir", metavar="DIR", help="keep the demo files in DIR (default: a temporary folder)")
    d.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD)
    _add_migrate(sub)
    register_jobs(sub, COMMANDS)  # extract, resize, merge, bench --job
    return ap


@contextmanager
def _writing(path):
    """An OS error while writing `path` (a full disk, ...) becomes a one-line error naming it."""
    try:
        yield
    except OSError as e:
        raise OutputPathError(f"{path}: cannot write: {e.strerror or e}") from None


def _overrides(spec: str | None) -> dict[str, str]:
    from .ops import overrides_from_env, parse_overrides

    return {**overrides_from_env(), **parse_overrides(spec)}


def _options(a: argparse.Namespace, **extra):
    from .options import TransferOptions

    return TransferOptions(subspace=a.subspace, tau=a.tau, device=a.device, backends=_overrides(a.backend),
                           max_memory=a.max_memory, max_gpu_memory=a.max_gpu_memory, cache=not a.no_cache,
                           cache_dir=a.cache_dir, **extra)


def _refine_options(a: argparse.Namespace):
    from .refine.cli import refine_options

    return refine_options(a)


def cmd_refine(a: argparse.Namespace) -> int:
    from .refine.cli import cmd_refine as run

    return run(a)


def cmd_transfer(a: argparse.Namespace) -> int:
    from .api import TransferResult, transfer_files

    opts = _options(a, method=a.method, rank=a.rank, format=a.format, alpha=a.alpha, skipped=a.skipped,
                    match=a.match, widths=a.widths, refine=_refine_options(a))
    progress = _progress_factory(a.quiet)

    def say(r) -> None:  # each LoRA of a batch as it completes
        if isinstance(r, TransferResult):
            s = r.report.summary()
            line, err = f"ok     {r.output}  ({s['transferred']}/{s['layers']} layers)", False
        else:
            line, err = f"FAILED {r.error}", True
        if progress:
            progress.write(line, file=sys.stderr if err else None)
        else:
            print(line, file=sys.stderr if err else sys.stdout)

    try:
        res = transfer_files(a.source, a.target, a.loras, a.output, opts, lora_dir=a.lora_dir, report=a.report,
                             plot=a.plot, overwrite=a.overwrite, progress=progress, on_result=say,
                             target_2=a.target_2)
    finally:
        if progress:
            progress.close()
    if not isinstance(res, TransferResult) and hasattr(res, "targets"):  # experts.ExpertsResult
        failed = 0
        for label, r in res.results.items():
            print(f"== {label.replace('_', '-')} expert: {res.targets[label]}")
            if not isinstance(r, TransferResult):  # a batch: each LoRA was said as it completed
                failed += len(r.failures)
                print(f"{len(r.results)} written, {len(r.failures)} failed")
                continue
            if not a.quiet:
                print(r.report.table())
            for w in r.report.warnings:
                print(f"prolora: warning: {label}: {w}", file=sys.stderr)
            print(f"wrote {r.output}")
        return 2 if failed else 0
    if isinstance(res, TransferResult):
        if not a.quiet:
            print(res.report.table())
            for m in res.report.info.get("matching", []):
                if m["source_block"] is None:
                    print(f"unmatched {m['attention']} block {m['target_block']}: no source block for it")
                else:
                    print(f"matched {m['attention']} block {m['target_block']} <- source block {m['source_block']} "
                          f"(mean phi {m['score']:.3f})")
        if "refine" in res.report.info and not a.quiet:
            from .refine.cli import report_lines

            print("\n".join(report_lines(res.report.info["refine"])))
        for w in res.report.warnings:
            print(f"prolora: warning: {w}", file=sys.stderr)
        print(f"wrote {res.output}")
        return 0
    s = res.stats
    passes = f" in {s.passes} passes" if s.passes > 1 else ""
    print(f"{len(res.results)} written, {len(res.failures)} failed; {s.modules} layers in {s.chunks} chunks{passes}, "
          f"{s.seconds.get('total', 0):.1f} s, peak RSS {s.peak_rss / 2**30:.2f} GiB")
    return 2 if res.failures else 0


def cmd_similarity(a: argparse.Namespace) -> int:
    from .api import similarity

    from .api import resolve_report_path

    for p in filter(None, (a.json, a.plot)):
        resolve_report_path(p, [a.source, a.target])
    from .experts import experts_of, similarity_experts

    experts = experts_of(a.target)  # a Wan 2.2 A14B folder: one table per expert
    if experts is not None and a.plot:
        raise OptionError(f"{a.target} holds two experts: --plot takes one (TARGET/transformer or transformer_2)")
    progress = _progress_factory(a.quiet)
    try:
        kwargs = dict(subspace=a.subspace, tau=a.tau, layers=a.layers, device=a.device, backends=_overrides(a.backend),
                      cache=not a.no_cache, cache_dir=a.cache_dir, max_memory=a.max_memory, progress=progress)
        if experts is not None:
            for label, r in similarity_experts(a.source, experts, json_path=a.json, **kwargs).items():
                print(f"== {label.replace('_', '-')} expert: {experts[label]}")
                if not a.quiet:
                    print(r.report.table())
            return 0
        res = similarity(a.source, a.target, **kwargs)
    finally:
        if progress:
            progress.close()
    if a.json:
        with _writing(a.json):
            res.report.write_json(a.json)
    if a.plot:
        from .plot import phi_plot

        with _writing(a.plot):
            phi_plot(res.report, a.plot, tau=a.tau, title=f"{res.report.info['source']} -> {res.report.info['target']}")
    if not a.quiet:
        print(res.report.table())
    return 0


def _print_facts(facts: dict, indent: str = "") -> None:
    for k, v in facts.items():
        if isinstance(v, dict):
            print(f"{indent}{k}:")
            _print_facts(v, indent + "  ")
        else:
            if isinstance(v, (list, tuple, set)):
                v = ", ".join(map(str, sorted(v, key=str))) if v else "-"
            print(f"{indent}{k}: {v}")


def cmd_compare(a: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .api import compare, resolve_report_path

    if a.json:
        resolve_report_path(a.json, [a.lora_a, a.lora_b])
    res = compare(a.lora_a, a.lora_b, a.base)
    ag = res.agreement
    print(f"{'module':<64} {'cosine':>7} {'rel.err':>8} {'energy':>7}")
    worst = sorted(ag.layers, key=lambda x: x.cosine if x.cosine is not None else -2)
    for x in worst[: a.rows]:
        name = x.module if len(x.module) <= 64 else "..." + x.module[-61:]
        f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{name:<64} {f(x.cosine, '7.4f')} {f(x.rel_error, '8.4f')} {f(x.energy_ratio, '7.3f')}")
    if len(ag.layers) > a.rows:
        print(f"  ... {len(ag.layers) - a.rows} more layers (lowest cosine first)")
    s = ag.summary()
    g = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"\n{s['shared_layers']} shared layers ({s['only_in_a']} only in A, {s['only_in_b']} only in B); overall "
          f"cosine {g(s['cosine'], '.4f')}, relative error {g(s['rel_error'], '.4f')}, energy ratio "
          f"{g(s['energy_ratio'], '.3f')}, mean layer cosine {g(s['mean_layer_cosine'], '.4f')}")
    if a.json:
        from .safetensors_io import atomic_path

        with _writing(a.json), atomic_path(a.json) as tmp:
            tmp.write_text(json.dumps({"a": res.names["a"], "b": res.names["b"], "summary": s,
                                       "layers": [asdict(x) for x in ag.layers], "only_in_a": ag.only_a,
                                       "only_in_b": ag.only_b}, indent=2) + "\n")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .api import inspect

    facts = inspect(a.path)
    if a.json:
        print(json.dumps(facts, indent=2, default=lambda x: sorted(x) if isinstance(x, set) else str(x)))
    else:
        _print_facts(facts)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .api import transfer
    from .synthetic import make_demo

    with tempfile.TemporaryDirectory(prefix="prolora-demo-") as tmp:
        folder = Path(a.dir) if a.dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        paths = make_demo(folder)
        out = folder / "lora_on_target.safetensors"
        print(f"demo: source {paths['source']}\n      target {paths['target']}\n      lora   {paths['lora']}")
        res = transfer(paths["source"], paths["target"], paths["lora"], out, method=a.method, overwrite=True)
        print(res.report.table())
        print(f"wrote {out}" + ("" if a.dir else " (temporary; use --dir to keep the files)"))
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    from .cache import BasisCache

    cache = BasisCache(a.cache_dir)
    if a.cache_command == "ls":
        models = cache.models()
        print(f"basis cache: {cache.root}")
        for m in models:
            print(f"  {m.model_id[:16]}  {m.family:<7} {m.layers:>5} layers {m.bytes / 2**20:>10.1f} MiB  {m.name}")
        if not models:
            print("  (empty)")
        return 0
    if a.cache_command == "rm":
        n = cache.remove(a.model)
        stale = cache.clean_stale()
        print(f"removed {n} model(s)" + (f" and {stale} stale temporary file(s)" if stale else "") + f" from {cache.root}")
        return 0
    from .api import build_cache

    progress = _progress_factory(a.quiet)
    try:
        n = build_cache(a.model, layers=a.layers, subspace=a.subspace, backends=_overrides(a.backend),
                        device=a.device, max_memory=a.max_memory, cache_dir=a.cache_dir, progress=progress)
    finally:
        if progress:
            progress.close()
    print(f"cached bases of {n} layers in {cache.root}")
    return 0


def cmd_backends(a: argparse.Namespace) -> int:
    from .ops import ALL_OPS, Problem

    for device in ("cpu", "cuda"):
        print(f"{device}:")
        for op in ALL_OPS:
            print(f"  {op.name}")
            for b, chosen, state in op.explain(Problem(device=device, dtype="float32")):
                print(f"   {'*' if chosen else ' '} {b.name:<20} {state}{'  (reference)' if b.reference else ''}")
    from . import _native

    print(f"native module: {'built' if _native.available() else _native.why_unavailable()}"
          + (" with CUDA" if _native.available() and _native.has_cuda() else ""))
    print("* = the default for a float32 problem of unknown shape (dispatch decides per call with the real "
          "problem); force any available backend with --backend or PROLORA_BACKEND")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    import torch

    from .bench import BenchConfig, run, table

    cfg = BenchConfig(family=a.family, width=a.width, depth=a.depth, folder=Path(a.dir), loras=a.loras, rank=a.rank,
                      subspace=a.subspace, max_memory=a.max_memory, repeats=a.repeats,
                      skip_reference=a.skip_reference, cache=not a.no_cache,
                      dtype=torch.bfloat16 if a.family in ("flux", "chroma", "qwen-image") else torch.float16)
    if a.dry_run:
        if not a.device.startswith("cuda"):
            raise OptionError("--dry-run plans a GPU run: add --device cuda")
        from .bench import device_plan, plan_table
        from .options import parse_size

        plan = device_plan(cfg, parse_size(a.max_gpu_memory))
        if a.json:
            with _writing(a.json):
                Path(a.json).write_text(json.dumps(plan, indent=2) + "\n")
        print(plan_table(plan))
        return 0
    if a.device != "cpu":
        raise OptionError(f"bench --device {a.device}: only the --dry-run plan runs on a GPU from here; the GPU "
                          "measurements are benchmarks/gpu_check.sh")
    print(table(run(cfg, Path(a.json) if a.json else None)))
    return 0


def _add_migrate(sub) -> None:
    m = sub.add_parser("migrate", help="move many LoRAs on a Ray cluster (many GPUs or machines; needs prolora[ray])")
    m.add_argument("source", metavar="SOURCE_BASE")
    m.add_argument("target", metavar="TARGET_BASE")
    m.add_argument("loras", metavar="LORA", nargs="*", help="LoRA .safetensors files")
    m.add_argument("--lora-dir", metavar="DIR", help="also every .safetensors LoRA in DIR")
    m.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="output folder (created if missing); holds prolora-manifest.json and the report")
    m.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="Ray cluster: an address (head:6379, ray://head:10001), auto (the running cluster; "
                        "the default of a bare --ray) or local (a new one here); without --ray: $RAY_ADDRESS, "
                        "else a running local cluster, else a new one")
    m.add_argument("--workers", type=int, metavar="N", help="worker actors (default: one per GPU with --device "
                   "cuda, else one per --cpus-per-worker CPUs of the cluster)")
    m.add_argument("--cpus-per-worker", type=float, default=1, metavar="C", help="(default %(default)s)")
    m.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="LoRAs per task, run in one pass over the layers (default %(default)s)")
    m.add_argument("--max-attempts", type=int, default=3, metavar="K",
                   help="tries of a LoRA whose worker crashes or raises (default %(default)s)")
    m.add_argument("--ship-cache", action="store_true",
                   help="send the bases to the workers through Ray's object store (no shared --cache-dir needed)")
    m.add_argument("--worker-cache-dir", metavar="DIR", help="where workers keep shipped bases (default: theirs)")
    m.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="(default %(default)s)")
    m.add_argument("--rank", default="same", help="output rank: same, 2r or N (default %(default)s)")
    m.add_argument("--format", choices=("same",) + FORMATS, default="same", help="output format (default: as the input)")
    m.add_argument("--alpha", choices=("keep", "rank"), default="keep")
    m.add_argument("--skipped", choices=("drop", "copy"), default="drop")
    m.add_argument("--match", choices=("auto", "name", "similarity"), default="auto")
    m.add_argument("--subspace", default=DEFAULT_SUBSPACE, metavar="MODE", help="(default %(default)s)")
    m.add_argument("--tau", type=float, default=DEFAULT_TAU, help="(default %(default)s)")
    m.add_argument("--device", default="cpu", help="the workers' device: cpu or cuda (default %(default)s)")
    m.add_argument("--backend", default=None, metavar="SPEC")
    m.add_argument("--max-memory", metavar="SIZE", help="host memory budget per worker, e.g. 8GB")
    m.add_argument("--max-gpu-memory", metavar="SIZE")
    m.add_argument("--cache-dir", metavar="DIR", help="basis cache built on the driver; without --ship-cache every "
                   "node must see it at this path (default $PROLORA_CACHE_DIR or ~/.cache/prolora)")
    m.add_argument("--report", metavar="FILE", help="final JSON report (default OUTDIR/prolora-migrate-report.json)")
    m.add_argument("--overwrite", action="store_true", help="replace outputs in OUTDIR the manifest does not know")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def cmd_migrate(a: argparse.Namespace) -> int:
    from .scaleout import migrate, require_ray

    require_ray()  # first: without Ray, one line that says how to get it, and nothing touched
    import torch

    from .api import lora_files
    from .options import TransferOptions

    loras = list(a.loras) + (lora_files(a.lora_dir) if a.lora_dir else [])
    here = a.device if a.device.startswith("cuda") and torch.cuda.is_available() else "cpu"  # the driver's
    opts = TransferOptions(method=a.method, rank=a.rank, format=a.format, alpha=a.alpha, skipped=a.skipped,
                           match=a.match, subspace=a.subspace, tau=a.tau, device=here, backends=_overrides(a.backend),
                           max_memory=a.max_memory, max_gpu_memory=a.max_gpu_memory, cache_dir=a.cache_dir)
    res = migrate(a.source, a.target, loras, a.output, opts, address=a.ray, workers=a.workers,
                  cpus_per_worker=a.cpus_per_worker, device=a.device, batch_size=a.batch_size,
                  max_attempts=a.max_attempts, ship_cache=a.ship_cache, worker_cache_dir=a.worker_cache_dir,
                  overwrite=a.overwrite, report=a.report, progress=not a.quiet)
    s = res.report["summary"]
    for error in sorted(res.failed.values()):
        print(f"FAILED {error}", file=sys.stderr)
    for w in res.report["warnings"]:
        print(f"prolora: warning: {w}", file=sys.stderr)
    print(f"{s['written']} written, {s['skipped']} already done, {s['failed']} failed; {s['workers']} workers, "
          f"{s['loras_per_minute']:.1f} LoRAs/min; bases {s['seconds']['cache']:.1f} s, "
          f"transfer {s['seconds']['transfer']:.1f} s")
    print(f"manifest {res.manifest}\nreport {res.report_path}")
    return 2 if res.failed else 0


COMMANDS = {"bench": cmd_bench, "compare": cmd_compare, "transfer": cmd_transfer, "similarity": cmd_similarity, "inspect": cmd_inspect, "demo": cmd_demo,
            "cache": cmd_cache, "backends": cmd_backends}
COMMANDS["migrate"] = cmd_migrate
COMMANDS["refine"] = cmd_refine


def _sigterm(signum, frame):  # turn SIGTERM into the same clean unwinding as Ctrl-C
    raise KeyboardInterrupt


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"prolora: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        with warnings.catch_warnings():
            if not args.debug:  # e.g. an unwritable cache: one line, not file:line and source
                warnings.showwarning = _one_line_warning
            return COMMANDS[args.command](args)
    except ProloraError as e:
        if args.debug:
            raise
        print(f"prolora: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # the environment (a full disk, a vanished folder), not a bug
        if args.debug:
            raise
        msg = " ".join(f"{e.filename + ': ' if isinstance(e.filename, str) else ''}{e.strerror or e}".split())
        print(f"prolora: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prolora: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line unless --debug
        if args.debug:
            raise
        msg = " ".join(str(e).split())
        print(f"prolora: internal error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
