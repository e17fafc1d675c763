"""Turn an ordinary model into a binary one: swap ``nn.Conv2d`` for ``BinaryConv2d``.

Which convs become binary: all of them, except (by default) the first conv and
the last conv/linear the forward pass runs (the XNOR-Net convention: those stay
real-valued), and except names matching a ``real`` pattern. A ``binary`` pattern
forces a layer binary, overriding the first/last rule. Patterns are shell-style
(``fnmatch``) on module names, e.g. ``features.0`` or ``layer4.*``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from bnnslim.binary.layers import BinaryConv2d
from bnnslim.errors import BnnslimError
from bnnslim.modes import eval_outputs
from bnnslim.plugin_types import SchemeSpec


@dataclass
class BinarizePlan:
    """Which layers became binary and why the others stayed real."""

    binary: list[str] = field(default_factory=list)
    real: dict[str, str] = field(default_factory=dict)  # name -> reason


def forward_order(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Module name -> index of its first call in one forward pass (a topological order)."""
    order: dict[str, int] = {}

    def hook(name: str) -> Callable[[nn.Module, object], None]:
        def record(_m: nn.Module, _inputs: object) -> None:
            order.setdefault(name, len(order))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if n and not list(m.children())]
    try:
        eval_outputs(model, example)
    finally:
        for h in handles:
            h.remove()
    return order


def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the conv and linear modules in the order one forward pass calls them."""
    order = forward_order(model, example)
    modules = dict(model.named_modules())
    return [n for n in sorted(order, key=order.__getitem__) if isinstance(modules[n], (nn.Conv2d, nn.Linear))]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def plan_binarization(
    model: nn.Module,
    example: torch.Tensor,
    real: Sequence[str] = (),
    binary: Sequence[str] = (),
    keep_first_last_real: bool = True,
) -> BinarizePlan:
    """Decide, without changing the model, which convs become binary."""
    order = execution_order(model, example)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for pattern in [*real, *binary]:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in convs):
            known = ", ".join(list(convs)[:8]) + (", ..." if len(convs) > 8 else "")
            raise BnnslimError(f"layer pattern '{pattern}' matches no conv layer",
                               f"conv layers are named: {known}")
    first = next((n for n in order if n in convs), None)
    last = order[-1] if order else None
    plan = BinarizePlan()
    for name, conv in convs.items():
        if isinstance(conv, BinaryConv2d) or _matches(name, binary):
            plan.binary.append(name)
        elif _matches(name, real):
            plan.real[name] = "matches a --real pattern"
        elif name not in order:
            plan.real[name] = "not used in the forward pass"
        elif keep_first_last_real and name == first:
            plan.real[name] = "first layer"
        elif keep_first_last_real and name == last:
            plan.real[name] = "last layer"
        else:
            plan.binary.append(name)
    return plan


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def apply_binarization(model: nn.Module, binary_layers: Sequence[str], scheme: SchemeSpec) -> nn.Module:
    """Replace the named convs by ``BinaryConv2d`` copies in place; returns ``model``."""
    for name in binary_layers:
        conv = model.get_submodule(name)
        if isinstance(conv, BinaryConv2d):
            conv.scheme = scheme
            continue
        if not isinstance(conv, nn.Conv2d):
            raise BnnslimError(f"layer '{name}' is not a Conv2d", "check the model file and the run directory")
        _set_submodule(model, name, BinaryConv2d.from_conv(conv, scheme))
    return model


def binary_convs(model: nn.Module) -> dict[str, BinaryConv2d]:
    """The binary convs of ``model`` by name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}


@torch.no_grad()
def clip_latent_weights(model: nn.Module, bound: float = 1.0) -> None:
    """Clip the latent weights of every binary conv to [-bound, bound] (BinaryConnect)."""
    for m in model.modules():
        if isinstance(m, BinaryConv2d):
            m.weight.clamp_(-bound, bound)
