"""What the FLUX.2 family tells the rest of prolora: which Flux generation a LoRA's keys and shapes
are for (FLUX.1 and FLUX.2 share the BFL block names, so FLUX.1's hint asks here too), the
refusals of pairs that cannot transfer, and the base-model metadata an extracted LoRA carries.

Telling FLUX.1 and FLUX.2 LoRAs apart (`generation`):

- names only FLUX.2 has: to_qkv_mlp_proj, ff.linear_in / linear_out, the shared
  *_stream_modulation, time_guidance_embed; only FLUX.1 has: per-block img_mod / txt_mod /
  modulation.lin, norm1.linear, proj_mlp, ff.net, time_text_embed, XLabs' processor names;
- shapes of the fused BFL modules, width-free: single_blocks.N.linear1 has 9h rows for h inputs in
  FLUX.2 (q, k, v + SwiGLU gate and up of 3h), 7h in FLUX.1 (q, k, v + a 4h GELU MLP); img_mlp.0
  6h vs 4h; img_mlp.2 takes 3h vs 4h inputs; linear2 4h vs 5h;
- block counts: FLUX.2 has at most 8 double blocks, FLUX.1 19; single blocks 38..47 exist only
  in FLUX.2 [dev];
- widths 4096 / 6144 ([klein] 9B, [dev]; FLUX.1 is 3072).

A LoRA of attention projections only, at width 3072 and in blocks both have, cannot be told
apart by its keys; its metadata can (ss_base_model_version / modelspec.architecture).
"""
from __future__ import annotations

import re

from .keys import MEMBER

# LoRA metadata (ss_base_model_version / modelspec.architecture) substrings -> member; asked before
# FLUX.1's "flux" (the registry lists this family first)
METADATA_HINTS = (("flux2", MEMBER), ("flux-2", MEMBER), ("flux.2", MEMBER), ("flux_2", MEMBER))

_FLUXISH = re.compile(r"double_blocks|single_blocks|single_transformer_blocks|stream_modulation|^lora_transformer_|"
                      r"to_qkv_mlp_proj|time_guidance_embed")
_SEP = "[._]"
_FLUX2_NAMES = re.compile(rf"to_qkv_mlp_proj|ff(?:_context)?{_SEP}linear_(?:in|out)|stream_modulation|"
                          r"time_guidance_embed")
_FLUX1_NAMES = re.compile(rf"img_mod|txt_mod|blocks{_SEP}\d+{_SEP}modulation{_SEP}lin|norm1{_SEP}linear|norm1_context|"
                          rf"proj_mlp|ff(?:_context)?{_SEP}net|time_text_embed|processor{_SEP}|"
                          rf"single_transformer_blocks{_SEP}\d+{_SEP}norm{_SEP}linear")
_BLOCK = re.compile(rf"(double|single)_(?:transformer_)?blocks{_SEP}(\d+){_SEP}(.*)$")
# BFL module in a block -> (out/in ratio of FLUX.2, of FLUX.1) of its LoRA's dW
_RATIOS = {"linear1": (9, 7), "img_mlp_0": (6, 4), "txt_mlp_0": (6, 4),
           "img_mlp_2": (1 / 3, 1 / 4), "txt_mlp_2": (1 / 3, 1 / 4), "linear2": (1 / 4, 1 / 5)}


def _evidence(key: str, module) -> tuple[str | None, str | None]:
    """(FLUX.2 evidence, FLUX.1 evidence) one LoRA module gives, as phrases."""
    if _FLUX2_NAMES.search(key):
        return f"FLUX.2 module names ('{key}')", None
    if _FLUX1_NAMES.search(key):
        return None, f"FLUX.1 module names ('{key}')"
    m = _BLOCK.search(key)
    if m is None:
        return None, None
    kind, index, rest = m.group(1), int(m.group(2)), m.group(3).replace(".", "_")
    if kind == "double" and index >= 8:
        return None, f"double block {index} (FLUX.2 has at most 8)"
    if kind == "single" and 38 <= index < 48:
        return f"single block {index} (FLUX.1 has 38)", None
    ratios = _RATIOS.get(rest)
    out, inp = getattr(module, "out_features", 0), getattr(module, "in_features", 0)
    if ratios and out and inp:
        ratio = out / inp
        if abs(ratio - ratios[0]) < 1e-6:
            return f"{rest} of {out} x {inp} (FLUX.2's layout)", None
        if abs(ratio - ratios[1]) < 1e-6:
            return None, f"{rest} of {out} x {inp} (FLUX.1's layout)"
    if rest.endswith("qkv") and inp in (4096, 6144):
        return f"width {inp} (FLUX.2 [klein] 9B / [dev]; FLUX.1 is 3072)", None
    return None, None


def generation(lora) -> tuple[int, str] | None:
    """(1 or 2, how it was told) for a LoRA with Flux block names whose keys or shapes say which
    FLUX generation it is for; (0, why) when they say both or neither (attention only, see the
    module doc); None when it has no Flux names."""
    if not any(_FLUXISH.search(k) for k in lora.modules):
        return None
    two = one = None
    for key, module in lora.modules.items():
        a, b = _evidence(key, module)
        two, one = two or a, one or b
        if two and one:
            return 0, f"marks of both FLUX.1 ({one}) and FLUX.2 ({two})"
    if two:
        return 2, two
    if one:
        return 1, one
    return 0, "Flux block names (attention only, which FLUX.1 and FLUX.2 share)"


def lora_hint(lora) -> tuple[str, str] | None:
    """("flux2", how) when a LoRA's names or shapes are FLUX.2's."""
    hit = generation(lora)
    return (MEMBER, hit[1]) if hit and hit[0] == 2 else None


def pair_refusal(source, target, widths: str = "refuse") -> str | None:
    """Why a transfer between these two models must not run (None: it may): FLUX.2 models of
    other widths ([klein] 4B / 9B, [dev]) share no layer shape; FLUX.2 and any other family
    (FLUX.1 above all, whose block names it shares) are unrelated architectures."""
    mine = [m for m in (source, target) if m.family == MEMBER]
    if not mine:
        return None
    if len(mine) == 1:
        return (f"source {source.name} is {_what(source)} but target {target.name} is {_what(target)}: unrelated "
                "architectures (other blocks, MLPs and modulation; FLUX.1 and FLUX.2 only share block names), so "
                "moving a LoRA between them would need training; cross-family transfer is not supported")
    hs, ht = getattr(source, "hidden", None), getattr(target, "hidden", None)
    if hs != ht and widths != "lstsq":
        return (f"source {source.name} ({source.variant}, width {hs}) and target {target.name} ({target.variant}, "
                f"width {ht}) are FLUX.2 models of other sizes, so no layer has the same shape; pass --widths lstsq "
                "to map each layer by LoRA-X's least-squares map where the two subspaces agree")
    return None


def _what(m) -> str:
    """A model's family member, and for FLUX.2 its variant."""
    return f"{m.family} (FLUX.2 {m.variant})" if m.family == MEMBER else m.family


def lora_metadata(model) -> dict[str, str]:
    """modelspec / kohya ss_* entries naming the base model of a LoRA extracted from `model`."""
    return {"modelspec.architecture": f"flux-2-{getattr(model, 'variant', 'klein')}",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux2",
            "modelspec.resolution": "1024x1024", "ss_base_model_version": "flux2", "ss_v2": "False"}
