"""`prolora refine` and the `--refine*` flags `prolora transfer` shares with it, and the report
lines both print."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..refine.loop import RefineOptions, RefineStats


def add_refine_arguments(p: argparse.ArgumentParser, default_steps: int) -> None:
    """The --refine* flags (steps default `default_steps`; 0 means off)."""
    d = RefineOptions()
    g = p.add_argument_group("refinement (a short data-free distillation of the LoRA's effect; off by default)")
    g.add_argument("--refine", type=int, default=default_steps, metavar="STEPS",
                   help="train the transferred LoRA's factors on the target for STEPS steps so that it changes the "
                        "target as the LoRA changes the source (default %(default)s)")
    g.add_argument("--refine-lr", type=float, default=d.lr, metavar="LR",
                   help="Adam step size, relative to each LoRA factor's RMS (default %(default)s)")
    g.add_argument("--refine-batch", type=int, default=d.batch, metavar="N",
                   help="inputs per step (default %(default)s)")
    g.add_argument("--refine-anchor", type=float, default=d.anchor, metavar="W",
                   help="weight of a relative L2 pull toward the transferred factors (default %(default)s)")
    g.add_argument("--refine-resolution", type=int, default=None, metavar="N",
                   help="latent size of the noise inputs (default: the model's sample size, at most 32)")
    g.add_argument("--refine-holdout", type=int, default=d.holdout, metavar="N",
                   help="held-out inputs the before/after check measures (default %(default)s)")
    g.add_argument("--refine-seed", type=int, default=d.seed, metavar="N",
                   help="seed of every random draw (default %(default)s)")
    g.add_argument("--refine-cond", default=None, metavar="KIND",
                   help="conditioning: prompts | prompts:FILE | tags | random (default: tags when the LoRA has "
                        "kohya tags, else the built-in prompts, through the models' own text encoders; without "
                        "any encoder the refinement refuses unless random context is stated with --refine-tokens)")
    g.add_argument("--refine-tokens", type=int, default=None, metavar="N",
                   help="context tokens of random conditioning (required without a text encoder; default with "
                        "one: 77 for CLIP-conditioned UNets, 256 T5 tokens for Flux)")
    g.add_argument("--text-encoder", action="append", default=[], metavar="FILE", dest="text_encoder",
                   help="a text encoder file (CLIP-L, CLIP-G / OpenCLIP, T5; .safetensors, float8 too) for models "
                        "that carry none; repeat for each encoder of the model")


def refine_options(a: argparse.Namespace) -> RefineOptions | None:
    """RefineOptions from the parsed flags; None when --refine is 0."""
    if not a.refine:
        return None
    return RefineOptions(steps=a.refine, lr=a.refine_lr, batch=a.refine_batch, anchor=a.refine_anchor,
                         resolution=a.refine_resolution, seed=a.refine_seed, cond=a.refine_cond, tokens=a.refine_tokens,
                         holdout=a.refine_holdout, text_encoders=tuple(a.text_encoder))


def report_lines(stats: RefineStats | dict, top: int = 5) -> list[str]:
    """The refinement rows: settings, the conditioning and where it came from, the time, the loss
    curve summary, the held-out delta-matching error before and after and whether the refined
    factors were kept, and the modules whose dW moved most."""
    s = stats if isinstance(stats, dict) else stats.asdict()
    settings = ", ".join(f"{k} {v}" for k, v in sorted(s["settings"].items()) if k != "steps")
    c, t = s.get("conditioning") or {}, s.get("timings") or {}
    lines = [f"refine: {s['steps']} steps ({settings}), {s['seconds']:.1f} s"
             + (f" (build {t['build']:.1f} s, encode {t['encode']:.1f} s, held-out {t['held_out']:.1f} s, "
                f"steps {t['steps']:.1f} s)" if "build" in t else "")]
    if c:
        lines += [f"refine: conditioning {c['kind']}: {c['context']}",
                  f"refine: text encoders: source {c['source']}; target {c['target']}",
                  f"refine: held-out contexts: {c['held_out']}"]
    verdict = "; kept" if s.get("kept", True) else ("; no fall beyond the held-out noise, so the transferred LoRA "
                                                   "is kept unrefined")
    lines += [f"refine: loss first {s['loss_first']:.4g}, last {s['loss_last']:.4g}, min {s['loss_min']:.4g}; "
              f"curve (per tenth) {' '.join(f'{x:.3g}' for x in s['curve'])}",
              f"refine: held-out delta-matching error {s['error_before']:.4f} before -> {s['error_after']:.4f} after "
              f"(||(T+L') - [T + (S+L) - S]||^2 / ||(S+L) - S||^2){verdict}"]
    if s.get("probes"):
        lines.append("refine: the same check at other token counts (random context; the model's count is the one "
                     "stated): " + ", ".join(f"{k} {b:.4f} -> {a:.4f}" for k, (b, a) in s["probes"].items()))
    moved = sorted(s["modules"].items(), key=lambda kv: -kv[1])[:top]
    if moved and s.get("kept", True):
        lines.append("refine: most changed modules (relative dW change): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in moved))
    return lines


def register(sub) -> None:
    """`prolora refine SOURCE TARGET LORA TRANSFERRED -o OUT`."""
    r = sub.add_parser("refine", help="refine a transferred LoRA on the target (data-free distillation of the "
                                      "LoRA's effect on the source)")
    r.add_argument("source", metavar="SOURCE_BASE", help="the base the LoRA was trained on")
    r.add_argument("target", metavar="TARGET_BASE", help="the base the LoRA was transferred to")
    r.add_argument("lora", metavar="LORA", help="the LoRA as trained on SOURCE_BASE")
    r.add_argument("transferred", metavar="TRANSFERRED", help="its transfer to TARGET_BASE (the starting point)")
    r.add_argument("-o", "--output", required=True, metavar="OUT", help="output .safetensors file (or folder)")
    r.add_argument("--report", metavar="FILE", help="write the refinement's figures as JSON")
    r.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never an input)")
    r.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    r.add_argument("--max-gpu-memory", metavar="SIZE",
                   help="refuse when the two denoisers' weights exceed this on a GPU")
    r.add_argument("-q", "--quiet", action="store_true", help="only the output path")
    add_refine_arguments(r, default_steps=150)
    r.set_defaults(run=cmd_refine)


def cmd_refine(a: argparse.Namespace) -> int:
    from ..errors import OptionError
    from ..outputs import resolve_report_path, write_checked
    from ..refine import refine

    opts = refine_options(a)
    if opts is None:
        raise OptionError("--refine 0: nothing to do")
    if a.report:
        resolve_report_path(a.report, [a.source, a.target, a.lora, a.transferred])
    res = refine(a.source, a.target, a.lora, a.transferred, a.output, opts, device=a.device,
                 max_gpu_memory=a.max_gpu_memory, overwrite=a.overwrite)
    if not a.quiet:
        for line in report_lines(res.stats):
            print(line)
    if a.report:
        doc = json.dumps({"output": str(res.output), "refine": res.stats.asdict()}, indent=1)
        write_checked(a.report, lambda p: Path(p).write_text(doc))
    print(f"wrote {res.output}", file=sys.stdout)
    return 0
