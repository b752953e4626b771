"""Procedural 16x16 RGB images: four shapes (the content classes) rendered in three looks.

- "base":  light random background, one saturated random-hue shape (the source model's data);
- "shift": dark background with a vertical gradient, warm-hued shapes (target 1 is fine-tuned on it);
- "style": teal background, shape filled with yellow/magenta 3-pixel horizontal stripes (the style LoRA).

Everything is a pure function of (look, seed, count): no files, no downloads, bit-identical reruns.
Images are float32 in [-1, 1], shape (N, 3, 16, 16).
"""
from __future__ import annotations

import math

import torch

SIZE = 16
SUPER = 4  # supersampling factor for anti-aliased edges
CLASSES = ("disc", "square", "triangle", "plus")
LOOKS = ("base", "shift", "style")


def _masks(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Anti-aliased coverage masks (N, 1, SIZE, SIZE) in [0, 1] of each label's shape."""
    n, s = len(labels), SIZE * SUPER
    coords = (torch.arange(s) + 0.5) / SUPER  # pixel units
    y, x = coords.view(1, s, 1), coords.view(1, 1, s)
    r = (4.0 + 2.5 * torch.rand(n, generator=g)).view(n, 1, 1)
    cx = (SIZE / 2 + (torch.rand(n, generator=g) * 4 - 2)).view(n, 1, 1)
    cy = (SIZE / 2 + (torch.rand(n, generator=g) * 4 - 2)).view(n, 1, 1)
    dx, dy = x - cx, y - cy
    lab = labels.view(n, 1, 1)
    disc = dx ** 2 + dy ** 2 < r ** 2
    square = torch.maximum(dx.abs(), dy.abs()) < 0.85 * r
    tri = (dy > -r) & (dy < 0.8 * r) & (dx.abs() < (dy + r) * 0.6)
    arm = 0.35 * r
    plus = ((dx.abs() < arm) & (dy.abs() < r)) | ((dy.abs() < arm) & (dx.abs() < r))
    m = torch.where(lab == 0, disc, torch.where(lab == 1, square, torch.where(lab == 2, tri, plus)))
    return torch.nn.functional.avg_pool2d(m.float().unsqueeze(1), SUPER)


def _hsv(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N,) hue/saturation/value in [0, 1] -> (N, 3) RGB."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[:, None] - (v * s)[:, None] * f


def render(look: str, labels: torch.Tensor, seed: int, any_background: bool = False) -> torch.Tensor:
    """Images of the given labels in `look`, deterministic in `seed`. `any_background`: a random
    background colour instead of the look's (used to train the style classifier)."""
    if look not in LOOKS:
        raise ValueError(f"look {look!r}: choose from {LOOKS}")
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    m = _masks(labels, g)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    rows = torch.arange(SIZE).view(1, 1, SIZE, 1).float()
    if look == "base":
        bg = (0.55 + 0.4 * u(n, 3)).view(n, 3, 1, 1)
        fg = _hsv(u(n), 0.7 + 0.3 * u(n), 0.6 + 0.3 * u(n)).view(n, 3, 1, 1)
    elif look == "shift":
        bg = (0.05 + 0.25 * u(n, 3)).view(n, 3, 1, 1) + 0.2 * rows / SIZE
        fg = _hsv((u(n) * 0.22 - 0.1) % 1.0, 0.6 + 0.4 * u(n), 0.8 + 0.2 * u(n)).view(n, 3, 1, 1)
    else:
        bg = (torch.tensor([0.1, 0.45, 0.5]) + 0.05 * (u(n, 3) - 0.5)).view(n, 3, 1, 1)
        stripe = (rows.long() // 3) % 2  # 3-pixel horizontal bands
        fg = torch.where(stripe == 0, torch.tensor([1.0, 0.9, 0.1]).view(1, 3, 1, 1),
                         torch.tensor([0.9, 0.1, 0.6]).view(1, 3, 1, 1))
    if any_background:
        bg = u(n, 3).view(n, 3, 1, 1)
    img = bg * (1 - m) + fg * m
    img = img + 0.02 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 2 - 1).float()


def dataset(look: str, count: int, seed: int, any_background: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): `count` images, classes balanced and shuffled, deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed * 7919 + LOOKS.index(look))
    labels = torch.arange(count) % len(CLASSES)
    labels = labels[torch.randperm(count, generator=g)]
    return render(look, labels, seed * 7919 + 17 + LOOKS.index(look), any_background), labels


def grid(images: torch.Tensor, cols: int = 8) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> one (H', W', 3) uint8 grid image (for README figures)."""
    n, _, h, w = images.shape
    rows = math.ceil(n / cols)
    out = torch.ones(rows * (h + 1) + 1, cols * (w + 1) + 1, 3)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = (im.permute(1, 2, 0) + 1) / 2
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)
