"""The subsidiary component of Xu, Dong, Li, Su, "A Main/Subsidiary Network
Framework for Simplifying Binary Neural Networks", CVPR 2019 (arXiv 1812.04210).

One real-valued selector ``M_c`` per channel of a group; the channel's mask is
the step ``m_c = 1{M_c > 0}`` (the paper's ``(sign(M)+1)/2``), trained with the
straight-through gradient ``d m / d M = 1{|M| < 1}``. While a group's selectors
learn, the main network is frozen (weights and BatchNorm statistics). The loss
is cross-entropy plus a budget-aware penalty

    L = CE + lambda * (mean(m) - r)^2

where ``r`` is the group's share of the remaining budget. The penalty pulls the
count towards ``r`` from both sides; cross-entropy pushes up the selectors of
channels that matter and down those of channels that do not, so a layer whose
channels matter more keeps more than its share, and one that matters less keeps
fewer. ``lambda`` is calibrated per group from the cross-entropy gradients at the
start (``penalty_weight``) so that the balance does not depend on the layer's
width or the loss scale; ``--penalty`` multiplies it.
(The authors' regularisers cannot aim at a ratio; the exact count is set
afterwards by :mod:`bnnslim.prune.budget`.)
"""

from __future__ import annotations

from typing import Any

import torch

from bnnslim.distributed import average_gradients
from bnnslim.modes import frozen
from bnnslim.plugin_types import Selection, SelectionContext

TRAIN_MODE_BN = False
SELECTOR_INIT = 0.1  # every channel starts kept, inside the straight-through window


class _StepSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, s: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(s)
        return (s > 0).to(s.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (s,) = ctx.saved_tensors
        return grad * (s.abs() < 1).to(grad.dtype)


def selector_mask(selector: torch.Tensor) -> torch.Tensor:
    """1 where the selector is positive, else 0; gradient 1{|s| < 1} (straight through)."""
    return _StepSTE.apply(selector)


REFERENCE_DEVIATION = 0.1


def penalty_weight(mean_abs_grad: torch.Tensor, n: int) -> torch.Tensor:
    """lambda such that keeping 10% of the group more than its share pushes each selector
    as hard as a typical channel's cross-entropy gradient: 2 lambda 0.1 / n = mean |dCE/dm|."""
    return mean_abs_grad.detach() * n / (2 * REFERENCE_DEVIATION)


def average_gradients_value(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over ranks (the same penalty weight everywhere under torchrun)."""
    from bnnslim.distributed import all_reduce_sum, world_size

    return all_reduce_sum(value.reshape(1))[0] / world_size()


def select_subsidiary(ctx: SelectionContext) -> Selection:
    """Learn the group's selectors with the main network frozen; score = selector value."""
    n = ctx.group.size
    selector = torch.full((n,), SELECTOR_INIT, device=ctx.device, requires_grad=True)
    target = ctx.suggested_keep / n
    model = ctx.model
    with frozen(model):  # the main network is fixed while its selectors learn
        saved_buffers = None
        if TRAIN_MODE_BN:  # batch statistics in the forward pass; the running ones are put back afterwards
            saved_buffers = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("weight")
                             and not k.endswith("bias")}
            model.train()
        else:
            model.eval()  # BatchNorm statistics stay fixed
        ctx.masks.set_source(ctx.group.id, lambda: selector_mask(selector))
        # SGD on the loss divided by the typical cross-entropy gradient: selectors move by about ``lr``
        # per step, and channels keep their relative importance (Adam would give every selector the same
        # step and make the whole group cross zero together).
        optimizer = torch.optim.SGD([selector], lr=ctx.lr, momentum=0.9)
        try:
            weight: torch.Tensor | None = None
            scale: torch.Tensor | float = 1.0
            for _ in range(ctx.steps):
                x, y = next(ctx.batches)
                optimizer.zero_grad(set_to_none=True)
                ce = ctx.objective(model(x), y, x)  # cross-entropy (+ distillation to the teacher)
                if weight is None:  # calibrate on this group's cross-entropy gradients
                    (grad,) = torch.autograd.grad(ce, selector, retain_graph=True)
                    typical = average_gradients_value(grad.abs().mean()).clamp(min=1e-12)
                    weight, scale = ctx.penalty * penalty_weight(typical, n), 1.0 / typical
                loss = (ce + weight * (selector_mask(selector).mean() - target) ** 2) * scale
                loss.backward()
                average_gradients([selector])  # identical selectors on every rank under torchrun
                optimizer.step()
        finally:
            if saved_buffers is not None:
                model.load_state_dict(saved_buffers, strict=False)
            ctx.masks.clear(ctx.group.id)
    learned = int((selector > 0).sum())
    return Selection(scores=selector.detach().clone(), keep=learned, state={"selector": selector.detach().clone()})
