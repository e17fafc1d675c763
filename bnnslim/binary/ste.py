"""Sign functions with straight-through gradients, and per-filter scales.

Binary networks replace weights and activations by their signs. ``sign`` has a
zero gradient almost everywhere, so training uses a *straight-through
estimator* (STE): the forward pass computes the sign, the backward pass uses the
gradient of a smooth stand-in.

=================  =====================================  =====================================
function           forward                                backward (d out / d x)
=================  =====================================  =====================================
``ste_sign``       sign(x) (0 -> 0)                       1{|x| <= 1}  (clipped identity)
``approx_sign``    sign(x) (0 -> 0)                       max(0, 2 - 2|x|)  (Bi-Real Net, Liu 2018)
``ste_sign_weight`` +1 if w >= 0 else -1                  1{|w| <= 1}
=================  =====================================  =====================================

Activations keep ``sign(0) = 0`` so that zero padding and masked channels stay
zero. Weights never map to 0 so that they pack into one bit each.
"""

from __future__ import annotations

from typing import Any

import torch


class _SignClippedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class _SignApproxSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.clamp(2.0 - 2.0 * x.abs(), min=0.0)


class _WeightSignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x); gradient passes where |x| <= 1 (XNOR-Net, BinaryNet)."""
    return _SignClippedSTE.apply(x)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x); gradient of the piecewise quadratic ApproxSign of Bi-Real Net: 2 - 2|x| on |x| < 1."""
    return _SignApproxSTE.apply(x)


def ste_sign_weight(w: torch.Tensor) -> torch.Tensor:
    """+1 where w >= 0, else -1; gradient passes where |w| <= 1."""
    return _WeightSignSTE.apply(w)


def mean_abs_scale(weight: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """XNOR-Net's per-filter scale alpha_o = mean |W_o|, over the kept inputs only.

    ``weight`` is ``[out, in, kh, kw]``; ``kept`` (0/1) broadcasts to ``[out, in, 1, 1]``.
    Averaging over kept inputs only makes alpha identical before and after the
    masked input channels are physically removed. Returns ``[out, 1, 1, 1]``.
    """
    absw = weight.abs()
    if kept is None:
        return absw.mean(dim=(1, 2, 3), keepdim=True)
    kept = kept.to(weight.dtype)
    total = (absw * kept).sum(dim=(1, 2, 3), keepdim=True)
    count = (kept.expand(weight.shape[0], weight.shape[1], 1, 1).sum(dim=(1, 2, 3), keepdim=True)
             * weight.shape[2] * weight.shape[3])
    return total / count.clamp(min=1.0)


def no_scale(weight: torch.Tensor, kept: torch.Tensor | None) -> None:
    """No per-filter scale (BinaryNet, Courbariaux et al. 2016)."""
    return
