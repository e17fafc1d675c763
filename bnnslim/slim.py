"""Structural slimming: remove masked channels for real, with everything coupled to them."""

from __future__ import annotations

import torch
from torch import nn

from bnnslim.errors import BnnslimError
from bnnslim.graph import build_graph
from bnnslim.prune.groups import PrunableGroup


def slim(model: nn.Module, groups: list[PrunableGroup], masks: dict[str, torch.Tensor],
         example: torch.Tensor) -> list[tuple[str, list[int]]]:
    """Remove, in place, every channel whose group mask is 0; returns (group, removed channels).

    Each group is pruned through torch-pruning's dependency graph from its root,
    so the root's BatchNorm, the consumers' input channels, residual partners
    and concat offsets all lose the same channels.
    """
    graph = build_graph(model, example)
    modules = dict(model.named_modules())
    removed_all = []
    for g in groups:
        mask = masks.get(g.id)
        if mask is None:
            continue
        if mask.numel() != g.size:
            raise BnnslimError(f"mask of group {g.id} has {mask.numel()} values, the layer has {g.size} filters",
                               "the run directory does not match the model: rerun `bnnslim prune`")
        removed = [int(i) for i in (mask <= 0).nonzero().flatten().tolist()]  # python ints (see torch-pruning notes)
        if not removed:
            continue
        root = modules[g.id]
        pruner = graph.get_pruner_of_module(root)
        group = graph.get_pruning_group(root, pruner.prune_out_channels, removed)
        if not graph.check_pruning_group(group):
            raise BnnslimError(f"removing {len(removed)} channels of {g.id} would empty a layer",
                               "keep at least one filter per layer (raise --keep or --min-keep)")
        group.prune()
        removed_all.append((g.id, removed))
    return removed_all
