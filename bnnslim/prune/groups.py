"""Prunable groups: the channels that must be removed together.

torch-pruning's dependency graph couples layers whose channels go together: a
conv's filters, its BatchNorm, the input channels of every layer that consumes
them, residual adds (several convs share one channel set) and concats (offsets).
bnnslim learns one selector per *group*, not per layer (Xu et al. learn one per
layer of a plain NIN, where the two coincide).

A group is prunable when every layer that produces its channels (a conv or
linear pruned on its output channels) is a ``BinaryConv2d`` that the user did not
exclude, and nothing in it mixes channels in a way that removing one would
change the others (GroupNorm/LayerNorm/InstanceNorm statistics, grouped convs,
the model's output itself). Groups are ordered bottom-up by the position of
their root (the earliest producer) in the forward pass.

What is counted for ``--keep``: the output filters of the producers of prunable
groups. A channel of a residual group shared by three convs counts three filters.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from bnnslim.binary.convert import forward_order
from bnnslim.binary.layers import BinaryConv2d

_NORMS_ACROSS_CHANNELS = (tp.ops.OPTYPE.GN, tp.ops.OPTYPE.LN, tp.ops.OPTYPE.IN)
#: Forward-order position of a layer the traced pass never reached: after every traced one.
UNTRACED = 1 << 30


@dataclass(frozen=True)
class Consumer:
    """A layer that reads the group's channels: ``positions[i]`` of its input is root channel ``root_idx[i]``."""

    name: str
    positions: tuple[int, ...]
    root_idx: tuple[int, ...]


@dataclass(frozen=True)
class PrunableGroup:
    """One set of coupled channels with a single keep/remove decision per channel."""

    id: str  # the root's module name
    size: int  # channels of the root
    producers: tuple[str, ...]  # binary convs whose filters are these channels
    consumers: tuple[Consumer, ...]  # convs/linears whose inputs are these channels
    order: int  # position of the root in the forward pass
    norms: tuple[str, ...] = ()  # batch norms over these channels

    @property
    def filters_per_channel(self) -> int:
        return len(self.producers)

    @property
    def filters(self) -> int:
        return self.size * self.filters_per_channel


@dataclass
class GroupScan:
    """Prunable groups, and why the other binary convs are not prunable."""

    groups: list[PrunableGroup] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # conv name -> reason

    @property
    def total_filters(self) -> int:
        return sum(g.filters for g in self.groups)


def find_groups(model: nn.Module, graph: tp.DependencyGraph, example: torch.Tensor,
                exclude: Sequence[str] = ()) -> GroupScan:
    """All prunable groups rooted at binary convs, bottom-up."""
    names = {m: n for n, m in model.named_modules()}
    order = forward_order(model, example)
    scan = GroupScan()
    seen: set[str] = set()
    for name, conv in model.named_modules():
        if not isinstance(conv, BinaryConv2d) or name in seen:
            continue
        if conv.groups != 1:
            scan.skipped[name] = "grouped or depthwise conv (pruned only through the layer that feeds it)"
            continue
        if conv not in graph.module2node:
            scan.skipped[name] = "not reached by the traced forward pass"
            continue
        pruner = graph.get_pruner_of_module(conv)
        group = graph.get_pruning_group(conv, pruner.prune_out_channels, list(range(conv.out_channels)))
        producers: list[str] = []
        consumers: list[Consumer] = []
        norms: list[str] = []
        reason = None
        for item in group:
            dep, idxs = item.dep, item.idxs
            node = dep.target
            module = node.module
            mname = names.get(module, "") if isinstance(module, nn.Module) else ""
            if node.type == tp.ops.OPTYPE.OUTPUT:
                reason = "its channels are an output of the model"
            elif node.type in _NORMS_ACROSS_CHANNELS:
                reason = f"{mname} normalises across channels ({type(module).__name__})"
            elif node.type == tp.ops.OPTYPE.PARAMETER:
                reason = "an unwrapped parameter depends on its channels"
            elif node.type == tp.ops.OPTYPE.BN:
                norms.append(mname)
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                depthwise = isinstance(module, nn.Conv2d) and module.groups == module.out_channels > 1
                if isinstance(module, nn.Conv2d) and module.groups != 1 and not depthwise:
                    reason = f"{mname} is a grouped conv"
                elif graph.is_out_channel_pruning_fn(dep.handler) and not depthwise:
                    if not isinstance(module, BinaryConv2d):
                        reason = f"{mname} also produces these channels and is not binary"
                    elif any(fnmatch.fnmatchcase(mname, p) for p in exclude):
                        reason = f"{mname} is excluded"
                    producers.append(mname)
                elif graph.is_in_channel_pruning_fn(dep.handler) or depthwise:
                    consumers.append(Consumer(mname, tuple(int(i) for i in idxs),
                                              tuple(int(i) for i in item.root_idxs)))
            if reason:
                break
        seen.update(producers)
        if reason is None and not consumers:
            reason = "no layer consumes its channels"
        if reason is not None:
            modules = dict(model.named_modules())
            for p in [p for p in producers if isinstance(modules[p], BinaryConv2d)] or [name]:
                scan.skipped.setdefault(p, reason)
            continue
        root = min(producers, key=lambda n: order.get(n, UNTRACED))
        scan.groups.append(PrunableGroup(id=root, size=conv.out_channels, producers=tuple(sorted(
            producers, key=lambda n: order.get(n, UNTRACED))), consumers=tuple(_merge(consumers)),
            order=order.get(root, UNTRACED), norms=tuple(sorted(set(norms)))))
    scan.groups.sort(key=lambda g: g.order)
    return scan


def _merge(consumers: list[Consumer]) -> list[Consumer]:
    """One entry per consumer layer (a layer may appear through several paths)."""
    merged: dict[str, dict[int, int]] = {}
    for c in consumers:
        merged.setdefault(c.name, {}).update(zip(c.positions, c.root_idx, strict=True))
    return [Consumer(n, tuple(sorted(m)), tuple(m[p] for p in sorted(m))) for n, m in merged.items()]
