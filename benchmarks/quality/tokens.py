"""Issue 27: `--refine` on the pruned target when its cross-attention takes a context of another
shape than refinement assumes, and no text encoder is beside the models.

The benchmark's models with a `--tokens N` class condition (models.TOKENS; the benchmark's own is
4): the source, the pruned and distilled target, the source LoRA and the target's oracle, trained
exactly as the benchmark trains them, then on the pruned target (gap closed on the eps of held-out
style images, the benchmark's measure):

- `copy` and `prolora-full`;
- what `prolora transfer ... --refine 150` alone does (no text encoder: a one-line refusal);
- prolora-full + refine 150 at batch 32 on stated random context of N tokens (matched) and of 77
  (CLIP's count, mismatched): the library's held-out figure and verdict, and the score of the
  refined factors whatever the verdict (they are kept here to be scored);
- each candidate's delta-matching error on random context of 1, 4 and 77 tokens (the shape probe).

    python -m benchmarks.quality.tokens --tokens 1 [--cache DIR]

writes DIR/tokens-N/result.json (models cached beside it). Single-threaded and seeded like the
benchmark; about 25 min of CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import models as M
from .pipeline import HERE

BASE = {"subspace": "energy:0.9", "tau": 0.8, "rank": "same", "skipped": "drop", "match": "auto"}


def _train(out: Path, cfg) -> None:
    from . import train
    from .models import load_model, save_model
    from .stages import save_lora

    if not (out / "source" / "unet").exists():
        save_model(train.train_source(cfg.source_steps)[0], out / "source")
    if not (out / "pruned" / "unet").exists():
        save_model(train.distill(load_model(out / "source"), cfg.distill_steps)[0], out / "pruned")
    for base in ("source", "pruned"):
        p = out / f"lora-{base}-0" / "lora.safetensors"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            save_lora(p, train.train_lora(load_model(out / base), cfg.lora_steps, 0, cfg.lora_rank)[0], cfg.lora_rank)


def _probe(s, t, lora, cand) -> dict[int, float]:
    """Delta-matching error of `cand` on random unit-scale context of 1, 4 and 77 tokens."""
    from prolora.refine.adapters import Adapter, place
    from prolora.refine.cond import Conditioner, Context, signature
    from prolora.refine.denoisers import build_denoiser
    from prolora.refine.loop import Pair, held_out_error

    sm, tm = build_denoiser(s), build_denoiser(t)
    ps, _ = place(lora, s, "unet", "source")
    pt, _ = place(cand, t, "unet", "target")
    pair = Pair(sm, tm, Adapter(sm, lora.modules, ps, "cpu", False), Adapter(tm, cand.modules, pt, "cpu", False))
    out = {}
    for tok in (1, 4, 77):
        cond = Conditioner(signature(sm), signature(tm), (Context(), Context()), 16, tok, "cpu")
        g = torch.Generator().manual_seed(4242)
        out[tok] = round(held_out_error(pair, [cond.batch(32, g, pair.dtypes) for _ in range(2)]), 4)
    return out


def run(out: Path, tokens: int) -> dict:
    import prolora
    import prolora.refine.loop as loop
    from prolora.families import open_model
    from prolora.formats import read_lora
    from prolora.refine import RefineOptions, refine_lora

    from .config import Config
    from .evaluate import Scorer

    cfg = Config()
    _train(out, cfg)
    src, tgt = out / "source" / "unet", out / "pruned" / "unet"
    lora_path = out / "lora-source-0" / "lora.safetensors"
    lora = read_lora(lora_path)
    scorer = Scorer(out / "pruned", read_lora(out / "lora-pruned-0" / "lora.safetensors").modules, (None, None),
                    cfg.n_func, 0, 0)
    gap = lambda lf: round(scorer.score(lf.modules, False)[0].gap_closed, 4)  # noqa: E731
    rows: dict = {"tokens": tokens}
    copy = prolora.transfer(src, tgt, lora_path, cache=False, **{**BASE, "method": "copy"}).lora
    plain = prolora.transfer(src, tgt, lora_path, cache=False, **{**BASE, "method": "prolora-full"}).lora
    try:
        prolora.transfer(src, tgt, lora_path, cache=False, **{**BASE, "method": "prolora-full"}, refine=150)
        rows["refine 150 alone"] = "ran"
    except prolora.ProloraError as e:
        rows["refine 150 alone"] = f"refused: {e}"
    with open_model(src) as s, open_model(tgt) as t:
        rows["copy"] = {"gap_closed": gap(copy), "probe": _probe(s, t, lora, copy)}
        rows["prolora-full"] = {"gap_closed": gap(plain), "probe": _probe(s, t, lora, plain)}
        real = loop.improved
        for n in sorted({tokens, 77}):
            verdict = {}

            def spy(b, a, r, verdict=verdict):
                verdict["kept"] = real(b, a, r)
                return True  # keep the factors, to score them whatever the check says

            loop.improved = spy
            t0 = time.perf_counter()
            try:
                lf, st = refine_lora(s, t, lora, plain, RefineOptions(steps=150, batch=32, cond="random", tokens=n))
            finally:
                loop.improved = real
            rows[f"prolora-full + refine, random {n} tokens"] = {
                "gap_closed": gap(lf), "held_out": [round(st.error_before, 4), round(st.error_after, 4)],
                "library_keeps": verdict["kept"], "library_probes": st.probes, "probe": _probe(s, t, lora, lf),
                "seconds": round(time.perf_counter() - t0, 1)}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.tokens", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1, help="class-condition tokens of the models (default 1)")
    p.add_argument("--cache", type=Path, default=HERE / ".cache", help="folder for the models and the result")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    M.TOKENS = a.tokens  # ClassCond reads it when built and applied
    out = a.cache / f"tokens-{a.tokens}"
    out.mkdir(parents=True, exist_ok=True)
    rows = run(out, a.tokens)
    (out / "result.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
