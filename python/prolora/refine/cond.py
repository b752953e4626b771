"""Data-free inputs for the refinement: latent noise, timesteps and a conditioning context.

`--refine-cond` chooses the context (conditioning.py finds the encoders and builds the pools):

- `prompts`: a built-in set of neutral prompts, `prompts:FILE` one prompt per line of FILE, and
  `tags` prompts drawn from a kohya LoRA's `ss_tag_frequency` metadata; encoded by the base
  models' own text encoders (a pipeline folder's, those a single file embeds, or `--text-encoder
  FILE`), each model through its own when both have them, else both through the one that does;
  without a tokenizer (textenc.py, tokens.py), random token ids go through the real encoders;
- `random`: Gaussian context with the per-channel mean and spread of those encoders' outputs, or,
  when there is no encoder, zero mean and unit scale at the stated `--refine-tokens`.

The held-out check draws from other contexts of the kind the model really sees: HELDOUT_PROMPTS
(or other random ids) through the encoders where there are encoders.

Which encoders a model has and how their outputs are combined, the denoiser's forward
signature, the latents, timesteps and the extra inputs a denoiser needs (a pooled embedding, time
or position ids, guidance) are its family's: the family's refine part (parts.py) says them.
Latents are pure Gaussian noise at `--refine-resolution`; timesteps are uniform.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputFileError, OptionError
from .parts import part_named, parts

# neutral prompts: no style, varied subjects, so the context covers ordinary use of the model
NEUTRAL_PROMPTS = (
    "a photo of a cat sitting on a wooden table", "a portrait of a woman in natural light",
    "a mountain landscape at sunrise", "a city street at night with cars", "a bowl of fruit on a kitchen counter",
    "an old man reading a book", "a red sports car on a country road", "a dog running on the beach",
    "a living room with a sofa and a lamp", "a forest path in autumn", "a close-up of a flower",
    "a group of people at a cafe", "a castle on a hill", "a child playing in a park", "a sailing boat on the sea",
    "a plate of food in a restaurant",
)
# prompts of the same kind that no refinement trains on: the held-out check's contexts
HELDOUT_PROMPTS = (
    "a bicycle leaning against a brick wall", "a young man smiling at the camera", "a lake surrounded by pine trees",
    "a cup of coffee on a desk", "a horse in a green field", "a bridge over a river in the fog",
    "a woman walking in the rain with an umbrella", "a table with books and a candle",
)


@dataclass
class Context:
    """Encoded or random conditioning for one model: a pool of contexts to draw batches from
    (prompts), or the statistics to draw them from (random)."""

    hidden: torch.Tensor | None = None  # [P, N, D] encoded prompts
    pooled: torch.Tensor | None = None  # [P, Dp]
    mean: torch.Tensor | None = None  # [D] per-channel mean of random context
    std: torch.Tensor | None = None  # [D]
    pooled_mean: torch.Tensor | None = None
    pooled_std: torch.Tensor | None = None


@dataclass
class Inputs:
    """One batch: the latent noise and the forward keywords of each model."""

    source: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)


def parse_cond(spec: str | None) -> tuple[str | None, Path | None]:
    """'prompts' | 'prompts:FILE' | 'tags' | 'random' | None (auto) -> (kind, file)."""
    if spec is None or spec == "auto":
        return None, None
    kind, _, arg = spec.partition(":")
    if kind not in ("prompts", "tags", "random") or (arg and kind != "prompts"):
        raise OptionError(f"--refine-cond {spec!r}: choose prompts, prompts:FILE, tags or random")
    return kind, Path(arg) if arg else None


def tag_prompts(metadata: dict[str, str], n: int = 16, per_prompt: int = 6, seed: int = 0) -> list[str]:
    """Prompts from kohya's `ss_tag_frequency` ({dataset: {tag: count}}): the top tags' order
    kept, each prompt `per_prompt` tags drawn in proportion to their counts (seeded). Empty when
    the metadata has no tags."""
    try:
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except ValueError:
        return []
    counts: dict[str, float] = {}
    for tags in (freq.values() if isinstance(freq, dict) else []):
        if isinstance(tags, dict):
            for tag, c in tags.items():
                if isinstance(c, (int, float)) and str(tag).strip():
                    counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + float(c)
    if not counts:
        return []
    tags = sorted(counts, key=lambda t: (-counts[t], t))[:64]
    weights = torch.tensor([counts[t] for t in tags], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = min(per_prompt, len(tags))
        idx = sorted(torch.multinomial(weights, k, replacement=False, generator=g).tolist())
        out.append(", ".join(tags[i] for i in idx))
    return out


def read_prompts(path: Path) -> list[str]:
    try:
        lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(f"{path}: cannot read prompts: {getattr(e, 'strerror', None) or e}") from None
    prompts = [s for s in lines if s and not s.startswith("#")]
    if not prompts:
        raise InputFileError(f"{path}: no prompts in it (one prompt per line)")
    return prompts


# ------------------------------------------------------------------------------ the inputs


@dataclass
class Signature:
    """What a denoiser's forward takes, read from the diffusers model and its config."""

    kind: str  # the family whose refine part reads and feeds the denoiser (its name)
    channels: int
    context_dim: int
    pooled_dim: int | None = None  # width of a pooled text embedding the forward takes
    time_ids: bool = False  # the forward takes the pixel image's size and crop
    guidance: bool = False  # the forward takes a distilled guidance scale
    accepts: frozenset[str] = frozenset()


def signature(model: torch.nn.Module) -> Signature:
    """What `model`'s forward takes, as the family whose denoiser it is reads it."""
    names = frozenset(inspect.signature(model.forward).parameters)
    for fam, part in parts():
        fields = part.signature(model.config, names)
        if fields is not None:
            return Signature(fam.name, **fields)
    raise OptionError(f"refinement does not know the inputs of {type(model).__name__}")


class Conditioner:
    """Draws batches of (latent noise, timestep, context) for the source and the target."""

    def __init__(self, source: Signature, target: Signature, contexts: tuple[Context, Context],
                 resolution: int, tokens: int, device: str) -> None:
        if (source.kind, source.channels, source.context_dim, source.pooled_dim) != \
                (target.kind, target.channels, target.context_dim, target.pooled_dim):
            raise OptionError("the source and target denoisers take different inputs (latent channels or context "
                              "width differ); refinement needs both to read the same inputs")
        self.part = part_named(source.kind)
        if resolution < 2 or (self.part.EVEN_LATENTS and resolution % 2):
            evens = " and ".join(p.EVEN_LATENTS for _, p in parts() if p.EVEN_LATENTS)
            raise OptionError(f"--refine-resolution {resolution}: must be at least 2"
                              + (f" (even for {evens})" if evens else ""))
        self.sig, self.contexts, self.resolution = source, contexts, resolution
        self.tokens, self.device = tokens, device

    def _context(self, ctx: Context, n: int, g: torch.Generator, pick: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        sig = self.sig
        if ctx.hidden is not None:
            hidden = ctx.hidden[pick]
            pooled = ctx.pooled[pick] if ctx.pooled is not None else None
        else:
            hidden = torch.randn(n, self.tokens, sig.context_dim, generator=g)
            if ctx.mean is not None:
                hidden = hidden * ctx.std + ctx.mean
            pooled = None
            if sig.pooled_dim:
                pooled = torch.randn(n, sig.pooled_dim, generator=g)
                if ctx.pooled_mean is not None:
                    pooled = pooled * ctx.pooled_std + ctx.pooled_mean
        if sig.pooled_dim and pooled is None:  # prompts encoded without a pooled output: unit-scale stand-in
            pooled = torch.randn(n, sig.pooled_dim, generator=g)
        return hidden, pooled

    def batch(self, n: int, g: torch.Generator, dtypes: tuple[torch.dtype, torch.dtype]) -> Inputs:
        """n inputs drawn from `g` (CPU generator: the same seed gives the same inputs anywhere)."""
        sig, r = self.sig, self.resolution
        src_ctx, tgt_ctx = self.contexts
        pick = None
        if src_ctx.hidden is not None:
            pick = torch.randint(0, len(src_ctx.hidden), (n,), generator=g)
        shared = src_ctx is tgt_ctx
        x, t = self.part.noise(sig, n, r, g)
        state = g.get_state()
        hs, ps = self._context(src_ctx, n, g, pick)
        if shared:
            ht, pt = hs, ps
        else:
            g.set_state(state)  # the same random draws for the target's own context
            ht, pt = self._context(tgt_ctx, n, g, pick)
        out = Inputs()
        for kw, hidden, pooled, dtype in ((out.source, hs, ps, dtypes[0]), (out.target, ht, pt, dtypes[1])):
            dev = lambda v, d=dtype: v.to(self.device, d)  # noqa: E731
            kw.update(self.part.inputs(sig, x, t, hidden, pooled, r, dev, self.device))
        return out


def default_tokens(sig: Signature) -> int:
    """Context length when none is given, as the denoiser's family says (e.g. CLIP's 77, 256 T5 tokens)."""
    return int(part_named(sig.kind).TOKENS)


def default_resolution(model: torch.nn.Module) -> int:
    """Latent size when none is given: the model's sample size, at most 32 (small is enough)."""
    size = model.config.get("sample_size") or 32
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(min(32, size))


__all__ = ["Conditioner", "Context", "HELDOUT_PROMPTS", "Inputs", "NEUTRAL_PROMPTS", "default_resolution",
           "default_tokens", "parse_cond", "read_prompts", "signature", "tag_prompts"]
