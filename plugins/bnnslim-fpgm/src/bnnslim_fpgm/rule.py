"""The FPGM rule on a bnnslim prunable group.

A group's channels are the output filters of one or more binary convs (several
in a residual group: a channel is then the concatenation of its filters in every
producer). Input channels that earlier groups already removed are masked out of
the filters first, so only the weights that stay in the slim model count.
"""

from __future__ import annotations

import torch
from torch import nn

from bnnslim.binary.layers import BinaryConv2d
from bnnslim.plugin_types import Selection, SelectionContext


def geometric_median_distance(filters: torch.Tensor) -> torch.Tensor:
    """``d_i = sum_j ||F_i - F_j||_2`` for ``filters`` of shape ``[n, features]``.

    The filter that minimises ``d`` is the geometric median of the set restricted
    to its members; filters with a small ``d`` are the redundant ones (FPGM).
    """
    f = filters.detach().to(torch.float64).flatten(1)
    return torch.cdist(f, f).sum(dim=1).to(torch.float32)


def group_filters(ctx: SelectionContext, binary: bool = False) -> torch.Tensor:
    """The group's filters as rows ``[channels, features]``, with removed input channels zeroed.

    ``binary=True`` uses the weights the layer computes with, ``alpha * sign(W)``
    (alpha over the kept inputs), instead of the latent real-valued ``W``.
    """
    modules = dict(ctx.model.named_modules())
    rows = []
    with torch.no_grad():
        for name in ctx.group.producers:
            conv = modules[name]
            if not isinstance(conv, nn.Conv2d) or conv.out_channels != ctx.group.size:
                continue
            w = conv.weight
            mask = ctx.masks.input_mask(name, conv.in_channels, w)
            kept = None if mask is None or conv.groups != 1 else mask.view(1, -1, 1, 1).expand(
                w.shape[0], -1, 1, 1)
            if binary and isinstance(conv, BinaryConv2d):
                scale = conv.scheme.scale(w, kept)
                w = conv.scheme.binarize_weight(w)
                w = w if scale is None else w * scale
            if kept is not None:
                w = w * kept
            rows.append(w.flatten(1))
    if not rows:
        raise ValueError(f"group {ctx.group.id} has no conv producer with {ctx.group.size} filters")
    return torch.cat(rows, dim=1)


def _select(ctx: SelectionContext, binary: bool) -> Selection:
    distance = geometric_median_distance(group_filters(ctx, binary)).cpu()
    return Selection(scores=distance, state={"fpgm_distance": distance})


def select_fpgm(ctx: SelectionContext) -> Selection:
    """Keep the filters farthest (in sum of L2 distances) from the others; latent weights."""
    return _select(ctx, binary=False)


def select_fpgm_binary(ctx: SelectionContext) -> Selection:
    """Like :func:`select_fpgm`, on the effective binary filters ``alpha * sign(W)``."""
    return _select(ctx, binary=True)
