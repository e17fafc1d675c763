"""What ``bnnslim info`` shows about a run's model beyond its cost table (:func:`bnnslim.report.layer_costs`,
the one per-layer walk): which binary convs prune keeps whole, and why."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def unprunable_convs(model: nn.Module, example: torch.Tensor, exclude: Sequence[str] = ()) -> dict[str, str]:
    """The binary convs whose filters ``bnnslim prune`` keeps whole, and why (the scan prune makes)."""
    from bnnslim.graph import build_graph
    from bnnslim.prune.groups import find_groups

    return find_groups(model, build_graph(model, example), example, exclude=exclude).skipped
