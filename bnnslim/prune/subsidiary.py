"""The subsidiary component of Xu, Dong, Li, Su, "A Main/Subsidiary Network
Framework for Simplifying Binary Neural Networks", CVPR 2019 (arXiv 1812.04210).

One real-valued selector ``M_c`` per channel of a group; the channel's mask is
the step ``m_c = 1{M_c > 0}`` (the paper's ``(sign(M)+1)/2``), trained with the
straight-through gradient ``d m / d M = 1{|M| < 1}``. While a group's selectors
learn, the main network is frozen (weights and BatchNorm statistics). The loss
is cross-entropy plus a budget-aware penalty

    L = CE + lambda * relu(mean(m) - r)

where ``r`` is the group's share of the remaining budget: selectors are pushed
down only while the group keeps more than its share, and cross-entropy pushes
up those whose channels matter, so the learned count can differ from ``r``.
(The authors' regularisers cannot aim at a ratio; the exact count is set
afterwards by :mod:`bnnslim.prune.budget`.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bnnslim.distributed import average_gradients
from bnnslim.plugin_types import Selection, SelectionContext

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


def select_subsidiary(ctx: SelectionContext) -> Selection:
    """Learn the group's selectors with the main network frozen; score = selector value."""
    n = ctx.group.size
    selector = torch.full((n,), SELECTOR_INIT, device=ctx.device, requires_grad=True)
    target = ctx.suggested_keep / n
    model = ctx.model
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in frozen:
        p.requires_grad_(False)
    model.eval()  # BatchNorm statistics stay fixed
    ctx.masks.set_source(ctx.group.id, lambda: selector_mask(selector))
    optimizer = torch.optim.Adam([selector], lr=ctx.lr)
    try:
        for _ in range(ctx.steps):
            x, y = next(ctx.batches)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y) + ctx.penalty * torch.relu(selector_mask(selector).mean() - target)
            loss.backward()
            average_gradients([selector])  # identical selectors on every rank under torchrun
            optimizer.step()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
        ctx.masks.clear(ctx.group.id)
    learned = int((selector > 0).sum())
    return Selection(scores=selector.detach().clone(), keep=learned, state={"selector": selector.detach().clone()})
