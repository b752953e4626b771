"""Commands that look at models and LoRAs without writing a LoRA: `similarity`, `compare`,
`inspect`, `cache` (build, ls, rm) and `backends`."""
from __future__ import annotations

import argparse
import json

from ..errors import OptionError
from ..options import DEFAULT_SUBSPACE
from .common import add_common, overrides, progress_factory, writing


def register(sub) -> None:
    s = sub.add_parser("similarity", help="per-layer subspace similarity of two base models")
    s.add_argument("source", metavar="SOURCE_BASE")
    s.add_argument("target", metavar="TARGET_BASE")
    s.add_argument("--layers", metavar="REGEX", help="only modules whose canonical name matches (e.g. 'attn')")
    s.add_argument("--json", metavar="FILE", help="write the per-layer report as JSON")
    s.add_argument("--plot", metavar="FILE.png", help="write a figure of phi per layer")
    add_common(s)
    s.set_defaults(run=cmd_similarity)

    cp = sub.add_parser("compare", help="agreement of two LoRAs for the same base (cosine, error, energy)")
    cp.add_argument("lora_a", metavar="LORA_A")
    cp.add_argument("lora_b", metavar="LORA_B", help="the reference (e.g. a LoRA trained on the target)")
    cp.add_argument("--base", metavar="MODEL", help="match module names through this model (formats may differ)")
    cp.add_argument("--json", metavar="FILE", help="write per-layer figures as JSON")
    cp.add_argument("--rows", type=int, default=30, help="table rows to print (default %(default)s)")
    cp.set_defaults(run=cmd_compare)

    i = sub.add_parser("inspect", help="describe a LoRA file or a base model")
    i.add_argument("path", metavar="FILE")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(run=cmd_inspect)

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
    c.set_defaults(run=cmd_cache)

    sub.add_parser("backends", help="list every op's backends, available or not, and why").set_defaults(run=cmd_backends)


def cmd_similarity(a: argparse.Namespace) -> int:
    from ..api import resolve_report_path, similarity
    from ..experts import experts_of, similarity_experts

    for p in filter(None, (a.json, a.plot)):
        resolve_report_path(p, [a.source, a.target])
    experts = experts_of(a.target)  # a Wan 2.2 A14B folder: one table per expert
    if experts is not None and a.plot:
        raise OptionError(f"{a.target} holds two experts: --plot takes one (TARGET/transformer or transformer_2)")
    progress = progress_factory(a.quiet)
    try:
        kwargs = dict(subspace=a.subspace, tau=a.tau, layers=a.layers, device=a.device, backends=overrides(a.backend),
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
        with writing(a.json):
            res.report.write_json(a.json)
    if a.plot:
        from ..plot import phi_plot

        with writing(a.plot):
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


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def cmd_compare(a: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..api import compare, resolve_report_path

    if a.json:
        resolve_report_path(a.json, [a.lora_a, a.lora_b])
    res = compare(a.lora_a, a.lora_b, a.base)
    ag = res.agreement
    print(f"{'module':<64} {'cosine':>7} {'rel.err':>8} {'energy':>7}")
    worst = sorted(ag.layers, key=lambda x: x.cosine if x.cosine is not None else -2)
    for x in worst[: a.rows]:
        name = x.module if len(x.module) <= 64 else "..." + x.module[-61:]
        print(f"{name:<64} {_fmt(x.cosine, '7.4f')} {_fmt(x.rel_error, '8.4f')} {_fmt(x.energy_ratio, '7.3f')}")
    if len(ag.layers) > a.rows:
        print(f"  ... {len(ag.layers) - a.rows} more layers (lowest cosine first)")
    s = ag.summary()
    print(f"\n{s['shared_layers']} shared layers ({s['only_in_a']} only in A, {s['only_in_b']} only in B); overall "
          f"cosine {_fmt(s['cosine'], '.4f')}, relative error {_fmt(s['rel_error'], '.4f')}, energy ratio "
          f"{_fmt(s['energy_ratio'], '.3f')}, mean layer cosine {_fmt(s['mean_layer_cosine'], '.4f')}")
    if a.json:
        from ..safetensors_io import atomic_path

        with writing(a.json), atomic_path(a.json) as tmp:
            tmp.write_text(json.dumps({"a": res.names["a"], "b": res.names["b"], "summary": s,
                                       "layers": [asdict(x) for x in ag.layers], "only_in_a": ag.only_a,
                                       "only_in_b": ag.only_b}, indent=2) + "\n")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from ..api import inspect

    facts = inspect(a.path)
    if a.json:
        print(json.dumps(facts, indent=2, default=lambda x: sorted(x) if isinstance(x, set) else str(x)))
    else:
        _print_facts(facts)
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    from ..cache import BasisCache

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
    from ..api import build_cache

    progress = progress_factory(a.quiet)
    try:
        n = build_cache(a.model, layers=a.layers, subspace=a.subspace, backends=overrides(a.backend),
                        device=a.device, max_memory=a.max_memory, cache_dir=a.cache_dir, progress=progress)
    finally:
        if progress:
            progress.close()
    print(f"cached bases of {n} layers in {cache.root}")
    return 0


def cmd_backends(a: argparse.Namespace) -> int:
    from .. import _native
    from ..ops import ALL_OPS, Problem

    for device in ("cpu", "cuda"):
        print(f"{device}:")
        for op in ALL_OPS:
            print(f"  {op.name}")
            for b, chosen, state in op.explain(Problem(device=device, dtype="float32")):
                print(f"   {'*' if chosen else ' '} {b.name:<20} {state}{'  (reference)' if b.reference else ''}")
    print(f"native module: {'built' if _native.available() else _native.why_unavailable()}"
          + (" with CUDA" if _native.available() and _native.has_cuda() else ""))
    print("* = the default for a float32 problem of unknown shape (dispatch decides per call with the real "
          "problem); force any available backend with --backend or PROLORA_BACKEND")
    return 0
