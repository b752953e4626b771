"""Which family builds a denoiser and its inputs: the `refine` part of each family record
(`Family.part("refine")`, e.g. prolora.families.sd.refine). A part is a module with:

    COMPONENT         the component refinement trains ("unet", "transformer")
    DESCRIBES         what refinement supports of the family, for the refusal of the others
    CLASSES           diffusers classes built from a component folder; DEFAULT_CLASS where the
                      config names none (None: it must)
    EVEN_LATENTS      None, or the family's name in the message when latent sides must be even
    TOKENS            context tokens of random conditioning by default
    claims(base)                      whether the model holds a denoiser the part builds
    from_single_file(base, dtype)     (model on the meta device, its state dict from the file)
    text_encoders(base, root)         [(role, encoder folder, tokenizer folder)] of a pipeline folder
    encoder_components(base)          [(component, drop its last layer)] a single file may embed
    context_width([(role, hidden)])   the context width those encoders give (checked against the denoiser)
    take(role, output, count)         (context part, pooled) of one encoder's output
    signature(config, forward names)  the Signature fields of a denoiser, or None when not its own
    noise(sig, n, resolution, g)      latent noise and timesteps
    inputs(sig, x, t, hidden, pooled, resolution, dev, device)   the forward's keywords
"""
from __future__ import annotations

from types import ModuleType

from .. import families
from ..errors import ModelError


def parts() -> list[tuple[families.Family, ModuleType]]:
    """(family, refine part) of every family that has one, in the order messages list them: the
    family of the default bench preset first, then registry order."""
    fams = [f for f in families.families() if f.has("refine")]
    fams.sort(key=lambda f: not any(p.default for p in f.bench.values()))
    return [(f, f.part("refine")) for f in fams]


def part_of(base) -> ModuleType:
    """The refine part of `base`'s family (for a model of no known member, the part that claims
    its denoiser: the quality benchmark's small UNets); ModelError naming the family when
    refinement cannot train it (a family without a refine part, e.g. Qwen-Image or Wan, or a
    model without the denoiser)."""
    fam = families.of(base)
    if fam is not None:
        candidates = [fam.part("refine")] if fam.has("refine") else []
    else:  # a model its reader opened without naming a member (an SD-layout UNet of no known size)
        candidates = [p for _, p in parts()]
    for part in candidates:
        if part.claims(base):
            return part
    raise ModelError(f"{base.path}: refinement supports {' and '.join(p.DESCRIBES for _, p in parts())}; "
                     f"this is a {base.family} model")


def part_named(name: str) -> ModuleType:
    """The refine part of the family `name` (a Signature's kind)."""
    return families.get(name).part("refine")
