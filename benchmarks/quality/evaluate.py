"""Scoring a LoRA on a target: weight space, denoiser outputs, generated samples.

For one target model, every candidate (no LoRA, copy, each transfer setting, a second oracle) is
merged into the target's UNet and scored against the oracle (the LoRA trained on the target):

- weight space: `prolora.compare` of the candidate with the oracle (cosine and relative error of
  the merged dW, all layers concatenated);
- functional: on held-out noised style images, how much of the gap between the target without a
  LoRA and the target with the oracle the candidate closes,
      gap_closed = 1 - E|eps_cand - eps_oracle|^2 / E|eps_none - eps_oracle|^2
  (1: behaves like the oracle; 0: no better than no LoRA; < 0: further away than no LoRA), and the
  same for the denoising loss on those images (loss_closed);
- samples: DDIM samples (same starting noise for every candidate) scored by the style classifier
  (mean probability of the style) and the content classifier (share showing the asked-for shape).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import CLASSES, dataset
from .models import T, load_model, merge_lora, noisy, sample


@dataclass
class Scores:
    cosine: float | None = None
    rel_error: float | None = None
    gap_closed: float | None = None
    loss: float | None = None
    loss_closed: float | None = None
    style: float | None = None
    content: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Scorer:
    """Holds one target model, its oracle, the held-out batch and the classifiers."""

    def __init__(self, target_dir: Path, oracle: dict, classifiers: tuple[torch.nn.Module, torch.nn.Module],
                 n_func: int = 256, n_samples: int = 96, sample_steps: int = 20) -> None:
        self.target_dir = target_dir
        self.model = load_model(target_dir)
        self.base = {k: v.clone() for k, v in self.model.unet.state_dict().items()}
        self.content_clf, self.style_clf = classifiers
        x0, self.labels = dataset("style", n_func, seed=400)
        g = torch.Generator().manual_seed(401)
        self.t = torch.randint(0, T, (n_func,), generator=g)
        self.noise = torch.randn(x0.shape, generator=g)
        self.x = noisy(x0, self.t, self.noise)
        self.sample_labels = torch.arange(n_samples) % len(CLASSES)
        self.sample_steps = sample_steps
        self.oracle = oracle
        self.e_none = self.eps(None)
        self.e_oracle = self.eps(oracle)

    def _with(self, modules: dict | None):
        self.model.unet.load_state_dict(self.base)
        if modules:
            merge_lora(self.model.unet, modules)
        return self.model

    @torch.no_grad()
    def eps(self, modules: dict | None) -> torch.Tensor:
        m = self._with(modules)
        return torch.cat([m.eps(self.x[i:i + 128], self.t[i:i + 128], self.labels[i:i + 128])
                          for i in range(0, len(self.x), 128)])

    @torch.no_grad()
    def samples(self, modules: dict | None) -> torch.Tensor:
        return sample(self._with(modules), self.sample_labels, seed=500, steps=self.sample_steps)

    def score(self, modules: dict | None, with_samples: bool) -> tuple[Scores, torch.Tensor | None]:
        e = self.eps(modules)
        mse = lambda a, b: float((a - b).pow(2).mean())  # noqa: E731
        gap = mse(self.e_none, self.e_oracle)
        loss, loss_none, loss_oracle = mse(e, self.noise), mse(self.e_none, self.noise), mse(self.e_oracle, self.noise)
        s = Scores(gap_closed=1 - mse(e, self.e_oracle) / gap, loss=loss,
                   loss_closed=(loss_none - loss) / (loss_none - loss_oracle))
        imgs = None
        if with_samples:
            imgs = self.samples(modules)
            with torch.no_grad():
                s.style = float(self.style_clf(imgs).softmax(1)[:, 1].mean())
                s.content = float((self.content_clf(imgs).argmax(1) == self.sample_labels).float().mean())
        return s, imgs
