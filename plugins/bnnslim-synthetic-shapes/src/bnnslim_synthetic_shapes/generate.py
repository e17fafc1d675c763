"""Drawing the shapes: one vectorised pass per class over a batch of images.

Every image is one shape of a random colour on a random, contrasting background,
at a random position and size, with pixel noise. The shape's class is its
outline only: no rotation (a rotated square would be a diamond), so the ten
classes stay distinct. Everything is drawn from a ``torch.Generator`` seeded by
the caller: the same arguments give the same bytes on every machine.
"""

from __future__ import annotations

import math

import torch

CLASSES: tuple[str, ...] = (
    "circle", "ring", "square", "frame", "triangle", "diamond", "plus", "cross", "hstripes", "vstripes",
)
NOISE_STD = 0.06  # of the [0, 1] intensity range
MIN_CONTRAST = 0.35  # |foreground - background| luminance, at least


def _inside(cls: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether the point ``(u, v)`` (shape coordinates: centre 0, radius 1, v downwards) is in the shape."""
    au, av = u.abs(), v.abs()
    box = torch.maximum(au, av)
    radius = torch.sqrt(u * u + v * v)
    if cls == "circle":
        return radius <= 1.0
    if cls == "ring":
        return (radius <= 1.0) & (radius >= 0.55)
    if cls == "square":
        return box <= 0.8
    if cls == "frame":
        return (box <= 0.85) & (box >= 0.5)
    if cls == "triangle":  # apex up, base down
        return (v >= -0.85) & (v <= 0.8) & (au <= (v + 0.85) / 1.65 * 0.95)
    if cls == "diamond":
        return au + av <= 1.0
    if cls == "plus":
        return ((au <= 0.25) & (av <= 1.0)) | ((av <= 0.25) & (au <= 1.0))
    if cls == "cross":
        d1, d2 = (u - v).abs() / math.sqrt(2), (u + v).abs() / math.sqrt(2)
        return (box <= 0.9) & ((d1 <= 0.2) | (d2 <= 0.2))
    if cls in ("hstripes", "vstripes"):
        along = v if cls == "hstripes" else u
        return (box <= 0.9) & (torch.remainder((along + 0.9) * 2.5, 1.0) < 0.5)
    raise ValueError(f"unknown shape class {cls!r}")


def _colours(n: int, channels: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background colours ``[n, C]`` in [0, 1] whose luminance differs by MIN_CONTRAST or more."""
    fg = torch.rand(n, channels, generator=g)
    bg = torch.rand(n, channels, generator=g)
    lum_fg, lum_bg = fg.mean(1, keepdim=True), bg.mean(1, keepdim=True)
    gap = lum_fg - lum_bg
    direction = torch.where(gap >= 0, 1.0, -1.0)
    shift = (MIN_CONTRAST - gap.abs()).clamp(min=0) * direction / 2  # push the two apart, half each
    return (fg + shift).clamp(0, 1), (bg - shift).clamp(0, 1)


def draw_shapes(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``uint8 [n, channels, size, size]`` and labels ``int64 [n]``, balanced over :data:`CLASSES`.

    Labels cycle through the classes in a seeded random order, so every class
    has ``n // 10`` or one more images.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=g)]
    centre = (0.35 + 0.3 * torch.rand(n, 2, generator=g)) * size  # in the middle 30% of the image
    radius = (0.2 + 0.16 * torch.rand(n, generator=g)) * size
    fg, bg = _colours(n, channels, g)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    for c, cls in enumerate(CLASSES):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() == 0:
            continue
        u = (xs[None] - centre[idx, 0, None, None]) / radius[idx, None, None]
        v = (ys[None] - centre[idx, 1, None, None]) / radius[idx, None, None]
        mask[idx] = _inside(cls, u, v)
    m = mask[:, None].float()
    images = m * fg[:, :, None, None] + (1 - m) * bg[:, :, None, None]
    images = images + NOISE_STD * torch.randn(images.shape, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels.to(torch.int64)
