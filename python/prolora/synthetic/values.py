"""Parameter values: a source model's (seeded, per name) and a target's (source + perturbation).

A value depends only on the seed, the component and the parameter name, so any parameter of a
model can be made alone, in any order, and a TARGET written later reproduces its source exactly
before adding a fine-tune-like change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checkpoints import BaseModel
from .spectra import generator, spectral_weight


def _is_lora_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A matrix or conv kernel a LoRA could adapt (embedding tables excluded): it gets a spectral value."""
    return name.endswith(".weight") and len(shape) in (2, 4) and ".embeddings." not in name


def source_tensor(component: str, name: str, shape: tuple[int, ...], seed: int,
                  device: str | torch.device | None = None) -> torch.Tensor:
    """The float32 value of one source parameter (depends only on seed, component and name, and
    on the device it is drawn on), on that device."""
    g = generator("source", seed, component, name, device=device)
    if _is_lora_weight(name, shape):
        return spectral_weight(shape, g)
    t = torch.randn(shape, generator=g, device=g.device)
    if ".embeddings." in name:
        return 0.02 * t
    if name.endswith(".bias"):
        return 0.01 * t
    return 1.0 + 0.05 * t  # norm scales


@dataclass(frozen=True)
class Perturbation:
    """How a target differs from its source, per weight: dW = size * ||W||_F * unit(drift + noise).

    The drift is a random product of rank max(1, d * rank_fraction), the noise dense Gaussian;
    `noise_fraction` is the noise's share of the energy. At the default size 0.1 the top-(d/2)
    subspaces keep phi ~ 0.96-0.98 for square weights and ~0.98-0.995 on the short side of 4:1
    ones; at 0.05, ~0.985-0.995; larger sizes go lower.
    """

    size: float = 0.1
    rank_fraction: float = 1 / 16
    noise_fraction: float = 0.2
    seed: int = 1


def perturb(w: torch.Tensor, name: str, p: Perturbation) -> torch.Tensor:
    """w + a fine-tune-like change of relative Frobenius size p.size (float32)."""
    g = generator("target", p.seed, name, device=w.device)
    m, n = w.shape[0], w[0].numel()
    r = max(1, round(min(m, n) * p.rank_fraction))
    drift = torch.randn(m, r, generator=g, device=g.device) @ torch.randn(r, n, generator=g, device=g.device)
    noise = torch.randn(m, n, generator=g, device=g.device)
    dw = math.sqrt(1 - p.noise_fraction) * drift / drift.norm() + math.sqrt(p.noise_fraction) * noise / noise.norm()
    dw *= p.size * w.norm() / dw.norm()
    return w + dw.reshape(w.shape)


class Values:
    """Produces each parameter's value: the source's, or source + perturbation for a target."""

    def __init__(self, seed: int, base: BaseModel | None, perturbation: Perturbation,
                 device: str | torch.device | None = None, new_modules: bool = False):
        """`new_modules`: the target is of a derived family (Chroma from FLUX.1-schnell), so a
        weight the base lacks is drawn fresh instead of being refused as a config mismatch."""
        self.seed, self.base, self.p, self.device, self.new_modules = seed, base, perturbation, device, new_modules

    def __call__(self, component: str, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The value on the host (drawn on `device` when given)."""
        return self._value(component, name, shape).cpu()

    def _value(self, component: str, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if self.base is None or not _is_lora_weight(name, shape):
            return source_tensor(component, name, shape, self.seed, self.device)
        module = f"{component}.{name[: -len('.weight')]}"
        ref = self.base.weights.get(module)
        if ref is None and self.new_modules:
            return source_tensor(component, name, shape, self.seed, self.device)
        if ref is None or tuple(ref.shape) != tuple(shape):
            have = None if ref is None else tuple(ref.shape)
            raise ValueError(f"base model {self.base.path} does not match the config at '{module}': {have} vs {shape}")
        return perturb(self.base.load(module).to(self.device or "cpu"), module, self.p)
