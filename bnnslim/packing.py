"""The 1-bit packed form of binary conv weights.

A binary conv's effective weight is ``alpha_o * sign(W)`` with ``sign(W)`` in
{-1, +1}. The packed form stores, per layer:

``<layer>.weight_bits``  uint8 ``[out, kh, kw, ceil(in_per_group / 8)]``: the signs packed
                         along input channels, 8 per byte, least significant bit
                         first (bit ``b`` of byte ``j`` is input channel ``8j + b``);
                         a set bit means +1; padding bits are 0.
``<layer>.alpha``        float32 ``[out]``: the per-filter scale (absent for schemes
                         without one).

Input channels are innermost so that a kernel can XNOR whole bytes (or words)
of packed activations at one spatial tap against them without repacking.
"""

from __future__ import annotations

import torch

BITS = 8


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a {-1, +1} tensor ``[out, in, kh, kw]`` into uint8 ``[out, kh, kw, ceil(in/8)]``."""
    if signs.dim() != 4:
        raise ValueError("expected a conv weight [out, in, kh, kw]")
    out, cin, kh, kw = signs.shape
    nbytes = (cin + BITS - 1) // BITS
    bits = (signs > 0).permute(0, 2, 3, 1).to(torch.uint8)  # [out, kh, kw, in]
    padded = torch.zeros(out, kh, kw, nbytes * BITS, dtype=torch.uint8)
    padded[..., :cin] = bits
    weights = (2 ** torch.arange(BITS, dtype=torch.int32)).to(torch.uint8)
    return (padded.view(out, kh, kw, nbytes, BITS) * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: float32 {-1, +1} ``[out, in, kh, kw]``."""
    out, kh, kw, nbytes = packed.shape
    shifts = torch.arange(BITS, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [out, kh, kw, nbytes, 8]
    bits = bits.reshape(out, kh, kw, nbytes * BITS)[..., :in_channels]
    return (bits.to(torch.float32) * 2 - 1).permute(0, 3, 1, 2).contiguous()
