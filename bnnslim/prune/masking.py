"""Masks that make pruned channels contribute nothing, to every consumer.

In a binary network a removed filter does not simply output 0: its BatchNorm
turns 0 into a constant and the next sign() into +-1, which the next layer
still reads. bnnslim therefore masks each pruned channel at the *inputs of all
its consumers* (after their sign, inside ``BinaryConv2d``; on the input tensor
of a real conv or linear), and binary scales average over kept inputs only.
The masked model then computes exactly what the slimmed model computes.

A group's mask is a vector over the root's channels, either fixed (0/1) or a
function that returns a differentiable mask (the subsidiary selector).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bnnslim.binary.layers import BinaryConv2d
from bnnslim.prune.groups import PrunableGroup

MaskSource = Callable[[], torch.Tensor]


class MaskController:
    """Applies group masks to the consumers of each group through forward pre-hooks."""

    def __init__(self, model: nn.Module, groups: list[PrunableGroup]) -> None:
        self.model = model
        self.groups = {g.id: g for g in groups}
        self._sources: dict[str, MaskSource] = {}
        self._readers: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for g in groups:
            for c in g.consumers:
                self._readers.setdefault(c.name, []).append(
                    (g.id, torch.tensor(c.positions, dtype=torch.long), torch.tensor(c.root_idx, dtype=torch.long)))
        self._handles: list[RemovableHandle] = []
        modules = dict(model.named_modules())
        for name in self._readers:
            self._handles.append(modules[name].register_forward_pre_hook(self._hook(name)))

    # -- which masks are active -------------------------------------------------
    def set_fixed(self, group_id: str, mask: torch.Tensor) -> None:
        """Fix the group's mask to ``mask`` (0/1, one value per root channel)."""
        fixed = mask.detach().to(torch.float32).clone()
        self._sources[group_id] = lambda: fixed

    def set_source(self, group_id: str, source: MaskSource) -> None:
        """Compute the group's mask on every forward pass (differentiable, e.g. a selector)."""
        self._sources[group_id] = source

    def clear(self, group_id: str) -> None:
        self._sources.pop(group_id, None)

    def fixed_masks(self) -> dict[str, torch.Tensor]:
        """The current mask of every active group, evaluated now (detached)."""
        with torch.no_grad():
            return {gid: src().detach().clone() for gid, src in self._sources.items()}

    def remove(self) -> None:
        """Detach from the model (no more masking)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self.model.modules():
            if isinstance(m, BinaryConv2d):
                m.input_mask = None

    # -- applying them ------------------------------------------------------------
    def input_mask(self, consumer: str, width: int, like: torch.Tensor) -> torch.Tensor | None:
        """The consumer's input mask ``[width]`` from all active groups, or None."""
        mask = None
        for gid, positions, root_idx in self._readers.get(consumer, ()):
            source = self._sources.get(gid)
            if source is None:
                continue
            if mask is None:
                mask = torch.ones(width, dtype=like.dtype, device=like.device)
            values = source().to(device=like.device, dtype=like.dtype)[root_idx.to(like.device)]
            mask = mask.index_put((positions.to(like.device),), values)
        return mask

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], Any]:
        def pre_hook(module: nn.Module, inputs: tuple[Any, ...]) -> Any:
            x = inputs[0]
            if isinstance(module, BinaryConv2d):
                module.input_mask = self.input_mask(name, module.in_channels, x)
                return None
            if isinstance(module, nn.Conv2d):
                mask = self.input_mask(name, module.in_channels, x)
                return None if mask is None else (x * mask.view(1, -1, 1, 1), *inputs[1:])
            if isinstance(module, nn.Linear):
                mask = self.input_mask(name, module.in_features, x)
                return None if mask is None else (x * mask, *inputs[1:])
            return None

        return pre_hook
