"""Per-layer cost report of a model: filters, parameters, MACs, binary operations."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnnslim.binary.layers import BinaryConv2d
from bnnslim.modes import eval_outputs


@dataclass
class LayerCost:
    """One conv or linear layer's size and work per image; ``params`` counts its weights (biases are not
    counted anywhere in bnnslim: they stay real and are few), as ``bnnslim info``, the export report and
    ``--budget params`` all do."""

    name: str
    kind: str  # "binary conv" | "conv" | "linear"
    filters: int
    params: int
    macs: int  # multiply-accumulates of real layers, per image (summed over every call)
    binary_ops: int  # XNOR-popcount operations of binary layers, per image (summed over every call)
    calls: int = 1  # how often the forward pass runs the layer (weight sharing: more than once)
    in_channels: int = 0  # input channels (convs) or features (linears)


def layer_costs(model: nn.Module, example: torch.Tensor) -> dict[str, LayerCost]:
    """Cost of every conv and linear layer for one image of ``example``'s shape.

    A layer that the forward pass runs more than once (weight sharing) counts its
    operations at every call and its parameters once.
    """
    costs: dict[str, LayerCost] = {}
    handles = []

    def add(cost: LayerCost) -> None:
        known = costs.get(cost.name)
        if known is None:
            costs[cost.name] = cost
        else:
            known.macs += cost.macs
            known.binary_ops += cost.binary_ops
            known.calls += 1

    def hook(name: str) -> Any:
        def record(m: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
            if isinstance(m, nn.Conv2d):
                per_out = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                ops = per_out * out[0].numel()
                binary = isinstance(m, BinaryConv2d)
                add(LayerCost(name, "binary conv" if binary else "conv", m.out_channels,
                              m.weight.numel(), 0 if binary else ops, ops if binary else 0, in_channels=m.in_channels))
            elif isinstance(m, nn.Linear):
                add(LayerCost(name, "linear", m.out_features, m.weight.numel(), m.in_features * out[0].numel(), 0,
                              in_channels=m.in_features))
        return record

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        eval_outputs(model, example[:1])
    finally:
        for h in handles:
            h.remove()
    return costs


def compare(before: dict[str, LayerCost], after: dict[str, LayerCost]) -> list[dict[str, Any]]:
    """Rows ``{layer, kind, filters_before, filters_after, ...}`` for every layer."""
    rows = []
    for name, b in before.items():
        a = after.get(name, b)
        rows.append({"layer": name, "kind": b.kind,
                     **{f"{k}_before": v for k, v in asdict(b).items() if k not in ("name", "kind")},
                     **{f"{k}_after": v for k, v in asdict(a).items() if k not in ("name", "kind")}})
    return rows


def kept_chart(rows: list[dict[str, Any]], path: Path) -> None:
    """A PNG bar chart of filters kept per binary layer (drawn with Pillow)."""
    from PIL import Image, ImageDraw

    from bnnslim._atomic import atomic_path

    rows = [r for r in rows if r["kind"] == "binary conv"]
    bar_h, gap, left, width = 16, 6, 170, 360
    height = 40 + len(rows) * (bar_h + gap)
    img = Image.new("RGB", (left + width + 110, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), "filters kept per binary layer (grey: before, blue: after)", fill="black")
    top = max([r["filters_before"] for r in rows] + [1])
    for i, r in enumerate(rows):
        y = 34 + i * (bar_h + gap)
        draw.text((10, y + 2), r["layer"][-26:], fill="black")
        draw.rectangle([left, y, left + int(width * r["filters_before"] / top), y + bar_h], fill=(210, 210, 210))
        draw.rectangle([left, y, left + int(width * r["filters_after"] / top), y + bar_h], fill=(40, 110, 200))
        draw.text((left + width + 8, y + 2), f"{r['filters_after']}/{r['filters_before']}", fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
