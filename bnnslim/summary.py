"""Per-layer summaries of a model: which layers are binary, filters, parameters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bnnslim.binary.layers import BinaryConv2d


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str  # "binary conv", "conv", "linear", "batchnorm"
    in_channels: int
    out_channels: int  # filters for convs, features for linears
    params: int


def layer_rows(model: nn.Module) -> list[LayerRow]:
    """One row per conv, linear and batch-norm layer, in module order."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, BinaryConv2d):
            rows.append(LayerRow(name, "binary conv", m.in_channels, m.out_channels, _params(m)))
        elif isinstance(m, nn.Conv2d):
            rows.append(LayerRow(name, "conv", m.in_channels, m.out_channels, _params(m)))
        elif isinstance(m, nn.Linear):
            rows.append(LayerRow(name, "linear", m.in_features, m.out_features, _params(m)))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            rows.append(LayerRow(name, "batchnorm", m.num_features, m.num_features, _params(m)))
    return rows


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters(recurse=False))


def unprunable_convs(model: nn.Module, example: torch.Tensor, exclude: Sequence[str] = ()) -> dict[str, str]:
    """The binary convs whose filters ``bnnslim prune`` keeps whole, and why (the scan prune makes)."""
    from bnnslim.graph import build_graph
    from bnnslim.prune.groups import find_groups

    return find_groups(model, build_graph(model, example), example, exclude=exclude).skipped
