"""The binary convolution layer.

``BinaryConv2d`` is an ``nn.Conv2d`` (so torch-pruning and every other tool sees
a conv) whose forward computes

    y = alpha * conv(sign(x) * m_in, sign(W)) + b

with ``W`` the real-valued latent weights that training updates, ``alpha`` the
scheme's per-filter scale (XNOR-Net: mean |W_o| over the kept inputs) and
``m_in`` an optional 0/1 input-channel mask set by pruning. The layer owns no
per-filter tensors besides ``weight`` and ``bias``, so the built-in conv pruner
of torch-pruning slims it correctly.
"""

from __future__ import annotations

import torch
from torch import nn

from bnnslim.plugin_types import SchemeSpec


class BinaryConv2d(nn.Conv2d):
    """A conv with binary weights and binary inputs under a named scheme."""

    def __init__(self, *args: object, scheme: SchemeSpec, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.scheme = scheme
        #: 0/1 mask over input channels ``[in_channels]`` or None; set by pruning.
        self.input_mask: torch.Tensor | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, scheme: SchemeSpec) -> BinaryConv2d:
        """A binary copy of ``conv`` with the same hyper-parameters and latent weights."""
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, scheme=scheme,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)  # type: ignore[union-attr]
        return new

    def kept_weight_inputs(self) -> torch.Tensor | None:
        """The input mask laid out per filter, ``[out, in/groups, 1, 1]``, or None."""
        if self.input_mask is None:
            return None
        per_group = self.input_mask.view(self.groups, self.in_channels // self.groups)
        per_filter = per_group.repeat_interleave(self.out_channels // self.groups, dim=0)
        return per_filter[:, :, None, None]

    def binary_weight(self) -> torch.Tensor:
        """The effective weight ``alpha * sign(W)`` as the forward pass uses it."""
        wb = self.scheme.binarize_weight(self.weight)
        alpha = self.scheme.scale(self.weight, self.kept_weight_inputs())
        return wb if alpha is None else wb * alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``alpha * conv(sign(x) * m_in, sign(W)) + b``.

        The scale is applied after the convolution, so the conv sums +-1 products
        only: every output is ``alpha`` times an integer, computed exactly in
        float whatever the summation order. A masked model and its slim copy
        therefore agree exactly (a count of 0 stays 0, so the next ``sign`` sees
        the same value), and so does an XNOR-popcount runtime.
        """
        xb = self.scheme.binarize_input(x)
        if self.input_mask is not None:
            xb = xb * self.input_mask.view(1, -1, 1, 1).to(xb.dtype)
        y = self._conv_forward(xb, self.scheme.binarize_weight(self.weight), None)
        alpha = self.scheme.scale(self.weight, self.kept_weight_inputs())
        if alpha is not None:
            y = y * alpha.reshape(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme.name}"
