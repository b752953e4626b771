"""What conditions a refinement, and from where: resolved before any model is built (`resolve`:
the refusals), then the context pools for training and for the held-out check (`pools`).

Encoders, per model: a pipeline folder's own, else those its single file embeds, else the
`--text-encoder` files; a model with none borrows the other model's. With no encoder anywhere
the refinement refuses unless the user states random context and its token count
(`--refine-cond random --refine-tokens N`): no silent fallback to a shape the model may never see.

The held-out check (loop.train's figure before and after, and the decision to keep the refined
LoRA) is measured on contexts the training did not draw, of the kind the model really sees: the
encoders' outputs on HELDOUT_PROMPTS (or on other random token ids where no tokenizer is
available) whenever there are encoders, whatever `--refine-cond` trained on; only without any
encoder is it random context of the stated token count, which cannot reveal a wrong count (said
in the report).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import BaseModel
from ..errors import OptionError
from ..lora import LoraFile
from .cond import HELDOUT_PROMPTS, NEUTRAL_PROMPTS, Context, parse_cond, read_prompts, tag_prompts
from .parts import part_of
from .textenc import Encoder, assign_roles, build, embedded, from_file, from_folder
from .tokens import has_tokenizer, length_of, prompt_ids, random_ids, tokenizer_for

RANDOM_PROMPTS, RANDOM_HELDOUT = 32, 16  # random-id sequences encoded where no tokenizer is available
LOOKED_FOR = ("looked for a pipeline folder's text_encoder/, text encoders embedded in a single file "
              "(cond_stage_model.*, conditioner.embedders.*, text_encoders.*) and --text-encoder")


@dataclass
class Plan:
    """The conditioning as resolved: kind, prompts, each model's encoders, the token count."""

    kind: str  # prompts | prompts:FILE | tags | random
    prompts: list[str] | None
    encoders: tuple[list[Encoder] | None, list[Encoder] | None]
    tokens: int | None  # random context's tokens / a T5's sequence length (None: the family's)
    info: dict[str, str] = field(default_factory=dict)


def _folder(base: BaseModel) -> Path | None:
    p = Path(base.path)
    return p if base.layout == "diffusers" and p.is_dir() and (p / "model_index.json").is_file() else None


def own_encoders(base: BaseModel) -> list[Encoder] | None:
    """The encoders `base` carries: its pipeline folder's, or those its single file embeds."""
    part = part_of(base)
    root = _folder(base)
    if root is not None:
        return from_folder(root, part.text_encoders(base, root))
    if base.layout == "diffusers":
        return None
    comps = part.encoder_components(base)
    found = embedded(base, [c for c, _ in comps])
    if not found:
        return None
    drop = dict(comps)
    for e in found:
        e.drop_last = drop.get(e.component, False)
    return assign_roles(found)


def preflight(opts, bases: tuple[BaseModel, BaseModel]) -> None:
    """The refusals that need no LoRA (no encoder and no stated context, an unreadable
    --text-encoder, a family refinement does not train), before a transfer does any work."""
    for b in bases:
        part_of(b)
    resolve(opts, LoraFile("peft", {}, {}), bases)


def resolve(opts, lora: LoraFile, bases: tuple[BaseModel, BaseModel]) -> Plan:
    """The conditioning of `opts` for these models, or a one-line refusal (OptionError)."""
    kind, file = parse_cond(opts.cond)
    files = assign_roles([from_file(f) for f in opts.text_encoders]) if opts.text_encoders else None
    own = [own_encoders(b) for b in bases]
    per = [o or files for o in own]
    if per[0] is None or per[1] is None:
        per = [per[0] or per[1]] * 2
    names = f"{bases[0].name} and {bases[1].name}"
    if per[0] is None:
        if kind == "random" and opts.tokens:
            return Plan("random", None, (None, None), int(opts.tokens))
        what = f"--refine-cond {opts.cond}" if kind not in (None, "random") else (
            "--refine-cond random without --refine-tokens" if kind == "random" else "--refine")
        raise OptionError(f"{what}: no text encoder for {names} ({LOOKED_FOR}); give --text-encoder FILE, a pipeline "
                          "folder, or state the context: --refine-cond random --refine-tokens N")
    _share_tokenizers([e for es in per for e in es])
    tokenized = all(has_tokenizer(e) for es in per for e in es)
    plan = Plan(kind or "prompts", None, (per[0], per[1]), opts.tokens)
    if kind is None and tokenized and tag_prompts(lora.metadata):
        plan.kind = "tags"
    if plan.kind == "random":
        return plan
    if (plan.kind == "tags" or file is not None) and not tokenized:
        raise OptionError(f"--refine-cond {opts.cond}: no tokenizer for the text encoders of {names} (a pipeline "
                          "folder's tokenizer/, or CLIP's vocabulary); use prompts (random token ids) or random")
    if plan.kind == "tags":
        plan.prompts = tag_prompts(lora.metadata, seed=opts.seed)
        if not plan.prompts:
            raise OptionError(f"{lora.path or 'the LoRA'}: --refine-cond tags, but the LoRA has no "
                              "ss_tag_frequency metadata; use prompts or random")
    elif file is not None:
        plan.kind, plan.prompts = f"prompts:{file}", read_prompts(file)
    else:
        plan.prompts = list(NEUTRAL_PROMPTS)
    return plan


def _share_tokenizers(encoders: list[Encoder]) -> None:
    """An encoder without a tokenizer borrows that of an encoder of the same role and vocabulary
    (an SDXL folder's tokenizer for the CLIP-L an SSD-1B single file embeds)."""
    for e in encoders:
        if e.tokenizer_dir is None:
            donor = next((o for o in encoders if o.tokenizer_dir is not None and o.role == e.role
                          and o.family == e.family and o.facts.get("vocab") == e.facts.get("vocab")), None)
            if donor is not None:
                e.tokenizer_dir = donor.tokenizer_dir


def _side(encoders: list[Encoder] | None, other: list[Encoder] | None, which: str) -> str:
    if encoders is None:
        return "none"
    if encoders is other and which == "target":
        return "the source's encoders"
    return " + ".join(e.describe() for e in encoders)


def check_width(plan: Plan, bases: tuple[BaseModel, BaseModel], context_dim: int) -> None:
    """Refuse encoders whose context is not the denoiser's width (a missing second encoder)."""
    for base, encoders in zip(bases, plan.encoders):
        if not encoders:
            continue
        width = part_of(base).context_width([(e.role, int(e.facts.get("hidden") or 0)) for e in encoders])
        if width != context_dim:
            raise OptionError(f"{', '.join(e.describe() for e in encoders)}: {width}-wide context, but "
                              f"{base.name}'s denoiser takes {context_dim}; give its other text encoder with "
                              "--text-encoder")


def _budget(device: str, max_device_memory: int | None) -> int | None:
    if device != "cpu":
        return max_device_memory
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.8)
    except (ValueError, OSError, AttributeError):
        return None


@torch.no_grad()
def _encode(base: BaseModel, encoders: list[Encoder], sets: list[list[str]], counts: list[int], tokens: int,
            seeds: list[int], device: str, budget: int | None) -> tuple[list[Context], str]:
    """Each set through `encoders` as the family combines them: prompts when every encoder has a
    tokenizer, else `counts` random-id sequences; one encoder resident at a time."""
    part = part_of(base)
    toks = [tokenizer_for(e) for e in encoders]
    use_prompts = all(t is not None for t, _ in toks)
    hidden: list[list[torch.Tensor]] = [[] for _ in sets]
    pooled: list[torch.Tensor | None] = [None] * len(sets)
    for enc, (tok, _) in zip(encoders, toks):
        length = length_of(enc, tokens)
        model = build(enc, device, budget)
        for i, prompts in enumerate(sets):
            ids = prompt_ids(tok, prompts, length) if use_prompts else random_ids(enc, counts[i], length, seeds[i])
            hs, ps = [], []
            for j in range(0, len(ids), 8):
                h, p = part.take(enc.role, model(ids[j:j + 8].to(device), output_hidden_states=True), len(encoders))
                if h is not None:
                    hs.append(h.float().cpu())
                if p is not None:
                    ps.append(p.float().cpu())
            if hs:
                hidden[i].append(torch.cat(hs))
            if ps:
                pooled[i] = torch.cat(ps)
        del model
    how = toks[0][1] if len({h for _, h in toks}) == 1 else "; ".join(f"{e.label}: {h}" for e, (_, h) in zip(encoders, toks))
    return [Context(hidden=torch.cat(h, dim=-1), pooled=p) for h, p in zip(hidden, pooled)], how


def _stats(ctx: Context) -> Context:
    """Per-channel mean and spread of encoded contexts (over prompts and tokens), for `random`."""
    h = ctx.hidden.reshape(-1, ctx.hidden.shape[-1])
    out = Context(mean=h.mean(0), std=h.std(0).clamp_min(1e-6))
    if ctx.pooled is not None:
        out.pooled_mean, out.pooled_std = ctx.pooled.mean(0), ctx.pooled.std(0).clamp_min(1e-6)
    return out


def pools(plan: Plan, bases: tuple[BaseModel, BaseModel], tokens: int, device: str, max_device_memory: int | None,
          seed: int, holdout: int) -> tuple[tuple[Context, Context], tuple[Context, Context]]:
    """(training contexts, held-out contexts) of the source and the target; fills plan.info."""
    if plan.encoders[0] is None:
        ctx = Context()
        plan.info = {"context": f"random Gaussian context, {tokens} tokens, unit scale (zero mean, unit spread: no "
                                "text encoder to take statistics from; the token count as stated)",
                     "source": "none", "target": "none",
                     "held_out": f"{holdout} inputs with other random contexts of the stated {tokens} tokens (the "
                                 "denoiser's cross-attention takes any count and no encoder gives the real one, so "
                                 "this check cannot reveal a wrong --refine-tokens)"}
        return (ctx, ctx), (Context(), Context())
    budget = _budget(device, max_device_memory)
    train_set = plan.prompts if plan.prompts is not None else list(NEUTRAL_PROMPTS)
    out: list[tuple[Context, Context]] = []
    done: dict[int, tuple[Context, Context, str]] = {}
    for base, encoders in zip(bases, plan.encoders):
        if id(encoders) not in done:
            (tr, ho), how = _encode(base, encoders, [train_set, list(HELDOUT_PROMPTS)], [RANDOM_PROMPTS, RANDOM_HELDOUT],
                                    tokens, [seed + 11, seed + 1_000_003], device, budget)
            done[id(encoders)] = (tr, ho, how)
        out.append(done[id(encoders)])
    (s_tr, s_ho, how), (t_tr, t_ho, _) = out
    random_ids = how.startswith("random token ids")
    if plan.kind == "random":
        s_tr, t_tr = _stats(s_tr), (_stats(t_tr) if t_tr is not s_tr else None)
        t_tr = t_tr or s_tr
        made = f"{RANDOM_PROMPTS} random-token-id prompts" if random_ids else f"{len(train_set)} built-in prompts"
        context = (f"random Gaussian context, {tokens} tokens, with the per-channel mean and spread of the encoders' "
                   f"outputs on {made}")
    elif random_ids:
        context = f"{RANDOM_PROMPTS} prompts as {how}, through the encoders"
    else:
        context = f"{len(train_set)} {'prompts from ' + plan.kind[8:] if plan.kind.startswith('prompts:') else plan.kind}" \
                  f" through the encoders, tokenized by {how}"
    held = f"{holdout} inputs with contexts from " + (
        f"{RANDOM_HELDOUT} other random-token-id prompts" if random_ids else
        f"{len(HELDOUT_PROMPTS)} held-out prompts no training draws from") + " through the same encoders"
    plan.info = {"context": context, "source": _side(plan.encoders[0], None, "source"),
                 "target": _side(plan.encoders[1], plan.encoders[0], "target"), "held_out": held}
    return (s_tr, t_tr), (s_ho, t_ho)


__all__ = ["Plan", "check_width", "own_encoders", "pools", "preflight", "resolve"]
