"""Packed ternary activations ("bits") and their exact torch emulation.

Between fused binary layers activations stay packed: int64 ``[N, H, W, NW, 2]``
with ``NW = ceil(C / 64)``; word ``j`` of a pixel holds channels ``64j..64j+63``
(LSB first), plane 0 the sign bits (value > 0) and plane 1 the nonzero bits, so
a value is +1, -1 or 0 (sign(0) = 0, as the binary convs binarize). The C++
kernels read and write this layout; the functions here are their torch
emulation (the fallback and the reference in tests).

A binary conv writing bits applies per-channel integer thresholds ``(a, b,
flip)`` to its integer dot products ``d``: ``lo = d < a``, ``hi = d >= b``;
nonzero = ``lo | hi``, sign = ``lo`` if ``flip`` else ``hi``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WORD = 64


def words(channels: int) -> int:
    """64-bit words per pixel for ``channels`` channels."""
    return math.ceil(channels / WORD)


def _pack_plane(flags: torch.Tensor) -> torch.Tensor:
    """bool ``[N, C, H, W]`` -> int64 ``[N, H, W, NW]`` (bit k of word j = channel 64j + k)."""
    n, c, h, w = flags.shape
    nw = words(c)
    padded = torch.zeros(n, h, w, nw * WORD, dtype=torch.int64)
    padded[..., :c] = flags.permute(0, 2, 3, 1).to(torch.int64)
    shifts = torch.arange(WORD, dtype=torch.int64)
    # distinct bits: the sum never carries, and bit 63 lands as int64's sign bit
    return (padded.view(n, h, w, nw, WORD) << shifts).sum(-1)


def pack_ternary(values: torch.Tensor) -> torch.Tensor:
    """Values in {-1, 0, +1} (any real tensor ``[N, C, H, W]``: its signs) -> packed bits ``[N, H, W, NW, 2]``."""
    return torch.stack([_pack_plane(values > 0), _pack_plane(values != 0)], dim=-1)


def pack_from_signs(sign: torch.Tensor, nonzero: torch.Tensor) -> torch.Tensor:
    """Bool sign and nonzero planes ``[N, C, H, W]`` -> packed bits (sign bits only where nonzero)."""
    return torch.stack([_pack_plane(sign & nonzero), _pack_plane(nonzero)], dim=-1)


def unpack_ternary(bits: torch.Tensor, channels: int) -> torch.Tensor:
    """Packed bits ``[N, H, W, NW, 2]`` -> float32 ``[N, C, H, W]`` in {-1, 0, +1} (channels-last memory)."""
    n, h, w, nw, _ = bits.shape
    shifts = torch.arange(WORD, dtype=torch.int64)
    planes = (bits.unsqueeze(-1) >> shifts) & 1  # [N, H, W, NW, 2, 64]
    sign = planes[..., 0, :].reshape(n, h, w, nw * WORD)[..., :channels]
    nonzero = planes[..., 1, :].reshape(n, h, w, nw * WORD)[..., :channels]
    return ((2 * sign - 1) * nonzero).to(torch.float32).permute(0, 3, 1, 2)


def apply_thresholds(counts: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Integer dot products ``[N, O, H, W]`` and thresholds int32 ``[O, 3]`` -> packed bits."""
    a, b, flip = (thresholds[:, i].view(1, -1, 1, 1).to(counts.dtype) for i in range(3))
    lo, hi = counts < a, counts >= b
    return pack_from_signs(torch.where(flip.bool(), lo, hi), lo | hi)


def thresholds_ternary(counts: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The {-1, 0, +1} values the thresholds give for ``counts`` ``[O, L]`` (for checks)."""
    a, b, flip = (thresholds[:, i].view(-1, 1).to(counts.dtype) for i in range(3))
    lo, hi = counts < a, counts >= b
    sign = torch.where(flip.bool(), lo, hi)
    return ((2 * sign.to(torch.int64) - 1) * (lo | hi).to(torch.int64))


def max_pool_emulated(bits: torch.Tensor, channels: int, kernel: tuple[int, int], stride: tuple[int, int],
                      padding: tuple[int, int], dilation: tuple[int, int], ceil_mode: bool) -> torch.Tensor:
    """Max pooling of packed bits through torch (unpack, pool, pack): the kernel's reference."""
    values = unpack_ternary(bits, channels)
    return pack_ternary(F.max_pool2d(values, kernel, stride, padding, dilation, ceil_mode))
