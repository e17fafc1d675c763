"""Rule-based selection baselines (greedy, norm-based), for fair comparison with
the learned subsidiary selectors: they run through the same layer-wise schedule,
budget and retraining. Each returns scores, higher = keep, and lets the budget
give the group its uniform share.

For binary filters a norm says little (Xu et al. 2019): every sign(W) filter has
the same L1 norm, so ``l1`` and ``alpha`` rank by the latent real weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bnnslim.binary.ste import mean_abs_scale
from bnnslim.plugin_types import Selection, SelectionContext


def _modules(ctx: SelectionContext) -> dict[str, torch.nn.Module]:
    return dict(ctx.model.named_modules())


def _weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__} has no weight tensor"
    return weight.detach()


def select_l1(ctx: SelectionContext) -> Selection:
    """L1 norm of each filter's latent weights, summed over the group's producers (Li et al. 2017)."""
    mods = _modules(ctx)
    scores = torch.stack([_weight(mods[p]).abs().flatten(1).sum(1) for p in ctx.group.producers]).sum(0)
    return Selection(scores=scores.float())


def select_alpha(ctx: SelectionContext) -> Selection:
    """The XNOR scale alpha_o = mean |W_o| of each filter, summed over producers."""
    mods = _modules(ctx)
    scores = torch.stack([mean_abs_scale(_weight(mods[p]), None).flatten() for p in ctx.group.producers]).sum(0)
    return Selection(scores=scores.float())


def select_bn(ctx: SelectionContext) -> Selection:
    """|gamma| of the BatchNorms over the group's channels (network slimming, Liu et al. 2017)."""
    mods = _modules(ctx)
    norms = [mods[n] for n in ctx.group.norms if getattr(mods[n], "weight", None) is not None]
    if not norms:
        return Selection(scores=torch.ones(ctx.group.size))
    return Selection(scores=torch.stack([_weight(m).abs() for m in norms]).sum(0))


def select_random(ctx: SelectionContext) -> Selection:
    """Uniformly random scores (seeded per group)."""
    return Selection(scores=torch.rand(ctx.group.size, generator=ctx.generator))


GREEDY_ROUNDS = 4


@torch.no_grad()
def select_greedy(ctx: SelectionContext) -> Selection:
    """Remove, in up to 4 rounds, the channels whose removal raises the held-out loss least.

    Each round tries every remaining channel alone and removes the best
    ``ceil((kept - target) / rounds_left)``. Scores are the removal order
    (removed first = lowest), survivors highest.
    """
    n, target = ctx.group.size, ctx.suggested_keep
    x, y = ctx.heldout
    kept = torch.ones(n)
    scores = torch.full((n,), float(n))
    removed = 0
    was = ctx.model.training
    ctx.model.eval()
    try:
        for round_left in range(GREEDY_ROUNDS, 0, -1):
            excess = int(kept.sum()) - target
            if excess <= 0:
                break
            candidates = kept.nonzero().flatten().tolist()
            losses = []
            for c in candidates:
                trial = kept.clone()
                trial[c] = 0
                ctx.masks.set_fixed(ctx.group.id, trial)
                losses.append(F.cross_entropy(ctx.model(x), y).item())
            ranked = [c for _, c in sorted(zip(losses, candidates, strict=True))]
            for c in ranked[: math.ceil(excess / round_left)]:
                kept[c] = 0
                scores[c] = removed
                removed += 1
    finally:
        ctx.masks.clear(ctx.group.id)
        ctx.model.train(was)
    return Selection(scores=scores)
