"""Training: the source model, the two targets, the style LoRAs and the two classifiers.

Every function is deterministic in its seed (single-threaded torch, fixed generators).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .data import CLASSES, dataset
from .models import LORA_TARGETS, NULL, SOURCE_UNET, T, Denoiser, new_model, noisy, prune

BATCH = 32
DROP = 0.1  # class dropout (classifier-free guidance)


def fit(params: list[nn.Parameter], loss_fn: Callable[[torch.Generator], torch.Tensor], steps: int, lr: float,
        seed: int, warmup: int = 50) -> list[float]:
    """AdamW with linear warm-up and cosine decay to lr/10; returns the loss every 50 steps."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    log, acc = [], 0.0
    for step in range(steps):
        f = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr * f
        loss = loss_fn(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        acc += float(loss.detach())
        if (step + 1) % 50 == 0:
            log.append(round(acc / 50, 5))
            acc = 0.0
    return log


def _batch(images: torch.Tensor, labels: torch.Tensor, g: torch.Generator):
    """A random batch, noised: (x_t, t, eps, labels with class dropout)."""
    idx = torch.randint(0, len(images), (BATCH,), generator=g)
    t = torch.randint(0, T, (BATCH,), generator=g)
    eps = torch.randn(BATCH, *images.shape[1:], generator=g)
    lab = torch.where(torch.rand(BATCH, generator=g) < DROP, NULL, labels[idx])
    return noisy(images[idx], t, eps), t, eps, lab


def denoise_loss(model: Denoiser, images: torch.Tensor, labels: torch.Tensor) -> Callable[[torch.Generator], torch.Tensor]:
    def loss(g: torch.Generator) -> torch.Tensor:
        x, t, eps, lab = _batch(images, labels, g)
        return (model.eps(x, t, lab) - eps).pow(2).mean()
    return loss


def train_source(steps: int, seed: int = 0) -> tuple[Denoiser, list[float]]:
    """The source base model: a DDPM on the "base" look."""
    model = new_model(SOURCE_UNET, seed)
    x, y = dataset("base", 8192, seed=100)
    params = list(model.unet.parameters()) + list(model.cond.parameters())
    return model, fit(params, denoise_loss(model, x, y), steps, 2e-3, seed)


def finetune(source: Denoiser, steps: int, mix: bool = False, seed: int = 0) -> tuple[Denoiser, list[float]]:
    """Target 1: full fine-tune of the source (UNet and class embedding) on the "shift" look; with
    `mix`, on half "shift" and half "base" images (a fine-tune that keeps the source's domain)."""
    model = source.copy()
    model.unet.train()
    x, y = dataset("shift", 4096, seed=101)
    if mix:
        xb, yb = dataset("base", 4096, seed=104)
        x, y = torch.cat([x[:2048], xb[:2048]]), torch.cat([y[:2048], yb[:2048]])
    params = list(model.unet.parameters()) + list(model.cond.parameters())
    return model, fit(params, denoise_loss(model, x, y), steps, 5e-4, seed)


def distill(source: Denoiser, steps: int, seed: int = 0) -> tuple[Denoiser, list[float]]:
    """Target 2: the pruned UNet (fewer transformer blocks) trained to reproduce the source's
    predictions on noised "base" images; the class embedding is the source's, frozen."""
    student = prune(source)
    student.unet.train()
    source.eval()
    for p in student.cond.parameters():
        p.requires_grad_(False)
    x, y = dataset("base", 4096, seed=102)

    def loss(g: torch.Generator) -> torch.Tensor:
        xt, t, _, lab = _batch(x, y, g)
        with torch.no_grad():
            teacher = source.eps(xt, t, lab)
        return (student.eps(xt, t, lab) - teacher).pow(2).mean()
    return student, fit(list(student.unet.parameters()), loss, steps, 5e-4, seed)


def train_lora(base: Denoiser, steps: int, seed: int, rank: int = 8) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[float]]:
    """A peft LoRA (rank `rank`, alpha = rank) on the attention modules' linears, trained on the
    "style" look. Returns ({module path: (down, up)}, loss log)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = base.copy()
    for p in list(model.unet.parameters()) + list(model.cond.parameters()):
        p.requires_grad_(False)
    torch.manual_seed(seed)  # peft's initialisation of lora_A
    model.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True))
    params = [p for n, p in model.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    model.unet.train()
    x, y = dataset("style", 512, seed=103)
    log = fit(params, denoise_loss(model, x, y), steps, 5e-3, seed + 1000)
    state = get_peft_model_state_dict(model.unet)
    out = {}
    for key, w in state.items():
        if key.endswith(".lora_A.weight"):
            stem = key.removesuffix(".lora_A.weight")
            out[stem] = (w.detach().clone(), state[stem + ".lora_B.weight"].detach().clone())
    return out, log


class Classifier(nn.Module):
    """A small CNN for 16x16 RGB images."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _augment(x: torch.Tensor, g: torch.Generator, colours: bool) -> torch.Tensor:
    """Pixel noise of random strength and a random +-1 pixel shift (robustness to imperfect
    samples); with `colours`, also random channel order, sign and contrast (shape cues only)."""
    n = len(x)
    if colours:
        perm = torch.stack([torch.randperm(3, generator=g) for _ in range(n)])
        x = torch.gather(x, 1, perm.view(n, 3, 1, 1).expand_as(x))
        x = x * torch.where(torch.rand(n, 3, 1, 1, generator=g) < 0.5, -1.0, 1.0)
        x = x * (0.4 + 0.6 * torch.rand(n, 1, 1, 1, generator=g))
    sigma = 0.15 * torch.rand(n, 1, 1, 1, generator=g)
    x = x + sigma * torch.randn(x.shape, generator=g)
    dy, dx = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(x, (dy, dx), (2, 3)).clamp(-1, 1)


def train_classifiers(steps: int = 400, seed: int = 0) -> tuple[Classifier, Classifier, dict[str, float]]:
    """(content classifier over CLASSES, style classifier style-vs-not), trained on every look (the
    style also on any background colour: it is recognised by its stripes), and their accuracies on
    held-out clean images."""
    looks = {look: dataset(look, 2048, seed=200 + i) for i, look in enumerate(("base", "shift", "style"))}
    looks["any"] = dataset("style", 2048, seed=204, any_background=True)  # the style = the stripes
    x = torch.cat([v[0] for v in looks.values()])
    content_y = torch.cat([v[1] for v in looks.values()])
    style_y = torch.cat([torch.full((2048,), int(look in ("style", "any"))) for look in looks])
    torch.manual_seed(seed)
    content, style = Classifier(len(CLASSES)), Classifier(2)
    acc = {}
    for name, clf, y in (("content", content, content_y), ("style", style, style_y)):
        def loss(g: torch.Generator, clf=clf, y=y) -> torch.Tensor:
            idx = torch.randint(0, len(x), (64,), generator=g)
            return nn.functional.cross_entropy(clf(_augment(x[idx], g, colours=clf is content)), y[idx])
        fit(list(clf.parameters()), loss, steps, 3e-3, seed + 7)
        clf.eval()
    held = {look: dataset(look, 512, seed=300 + i) for i, look in enumerate(("base", "shift", "style"))}
    with torch.no_grad():
        for look, (hx, hy) in held.items():
            acc[f"content_{look}"] = float((content(hx).argmax(1) == hy).float().mean())
            acc[f"style_{look}"] = float((style(hx).argmax(1) == int(look == "style")).float().mean())
    return content, style, acc
