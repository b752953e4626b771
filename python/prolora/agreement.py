"""Agreement between two LoRAs for the same base: per layer and overall, without forming dW.

For dW = s B A (B m x r, A r x n), inner products and norms come from r x r products:
<dW_a, dW_b>_F = s_a s_b * sum((B_a^T B_b) * (A_a A_b^T)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .lora import LoraModule


def _factors(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    r = m.rank
    return (m.up.double().reshape(m.up.shape[0], r) * m.scale, m.down.double().reshape(r, -1))


def inner(a: LoraModule, b: LoraModule) -> float:
    """<dW_a, dW_b>_F."""
    Ba, Aa = _factors(a)
    Bb, Ab = _factors(b)
    return float(((Ba.T @ Bb) * (Aa @ Ab.T)).sum())


@dataclass
class LayerAgreement:
    module: str
    shape: tuple[int, ...]
    cosine: float | None  # of the merged dW (None when one of them is zero)
    rel_error: float | None  # ||dW_a - dW_b|| / ||dW_b||
    energy_ratio: float | None  # ||dW_a||^2 / ||dW_b||^2
    norm_a: float
    norm_b: float


@dataclass
class Agreement:
    layers: list[LayerAgreement]
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float | int | None]:
        """Overall figures over the shared layers (as one concatenated dW), plus counts."""
        aa = sum(x.norm_a ** 2 for x in self.layers)
        bb = sum(x.norm_b ** 2 for x in self.layers)
        ab = sum(x.cosine * x.norm_a * x.norm_b for x in self.layers if x.cosine is not None)
        return {
            "shared_layers": len(self.layers), "only_in_a": len(self.only_a), "only_in_b": len(self.only_b),
            "cosine": ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else None,
            "rel_error": math.sqrt(max(aa + bb - 2 * ab, 0.0) / bb) if bb > 0 else None,
            "energy_ratio": aa / bb if bb > 0 else None,
            "mean_layer_cosine": (sum(x.cosine for x in self.layers if x.cosine is not None)
                                  / max(1, sum(x.cosine is not None for x in self.layers))),
        }


def compare_modules(a: dict[str, LoraModule], b: dict[str, LoraModule]) -> Agreement:
    """Compare modules keyed by the same (canonical) names; report the ones only one side has."""
    layers = []
    for name in [n for n in a if n in b]:
        ma, mb = a[name], b[name]
        if ma.out_features != mb.out_features or ma.in_features != mb.in_features:
            raise ValueError(f"module {name}: shapes differ ({tuple(ma.up.shape)}x{tuple(ma.down.shape)} vs "
                             f"{tuple(mb.up.shape)}x{tuple(mb.down.shape)})")
        aa, bb, ab = inner(ma, ma), inner(mb, mb), inner(ma, mb)
        na, nb = math.sqrt(max(aa, 0.0)), math.sqrt(max(bb, 0.0))
        layers.append(LayerAgreement(
            name, (ma.out_features, ma.in_features),
            cosine=ab / (na * nb) if na > 0 and nb > 0 else None,
            rel_error=math.sqrt(max(aa + bb - 2 * ab, 0.0)) / nb if nb > 0 else None,
            energy_ratio=aa / bb if bb > 0 else None, norm_a=na, norm_b=nb))
    return Agreement(layers, [n for n in a if n not in b], [n for n in b if n not in a])
