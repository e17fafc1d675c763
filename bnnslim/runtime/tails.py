"""A network's tail in one call: global average pooling, flatten and a linear classifier.

At batch 1 ``AdaptiveAvgPool2d(1)``, ``Flatten`` and ``Linear`` are three
module calls and three torch ops on a few hundred numbers, 10-20 us from Python
(a sixth of the VGG-11 example's packed time). :func:`fold_pooled_tails` makes
the linear layer (or, with none after it, the flatten) a :class:`PooledLinear`,
which computes the mean over the spatial positions (summed in position order) and
``x W^T + b`` (ATen's addmm) in one C++ call, to float rounding the modules' values
(bit for bit the fallback's, :func:`position_mean`); the pooling and a
flatten module before it pass their input on (:class:`FoldedAway`). A flatten
called as a function (``torch.flatten(x, 1)`` in a forward) stays: the layer
then pools its ``[N, C * H * W]`` input per channel.

A real 1x1 conv whose only consumer is the pooling (NIN's classifier,
``Conv2d(C, classes, 1)`` -> pool -> flatten) becomes the linear layer itself:
the mean over positions of ``W x + b`` is ``W mean(x) + b``, so the conv runs on
one pooled vector instead of every position (equal to float rounding).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TypeGuard

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnnslim.runtime import build
from bnnslim.runtime.changes import ChangeTracked
from bnnslim.runtime.fuse import FoldedAway, _set_submodule


def position_mean(positions: torch.Tensor) -> torch.Tensor:
    """The mean of ``[N, C, L]`` over ``L`` as the kernel computes it for float32: summed in position order, then
    divided by ``L`` (the same floats bit for bit; ATen's mean sums in an order of its own)."""
    if positions.dtype != torch.float32 or positions.shape[2] == 0:
        return positions.mean(2)
    total = torch.zeros(positions.shape[:2], dtype=positions.dtype, device=positions.device)
    for i in range(positions.shape[2]):
        total = total + positions[:, :, i]
    return total / positions.shape[2]


class PooledLinear(ChangeTracked):
    """Global average pooling, then the linear layer (or 1x1 conv) it replaced (``linear`` None: the pooling
    alone). A conv's weight keeps its ``[O, C, 1, 1]`` shape and state key."""

    def __init__(self, linear: nn.Linear | nn.Conv2d | None, channels: int = 0) -> None:
        super().__init__()
        if isinstance(linear, nn.Conv2d):
            channels = linear.in_channels
        elif linear is not None:
            channels = linear.in_features
        self.channels = channels
        self.weight = None if linear is None else linear.weight  # the layer's parameters and state keys
        self.bias = None if linear is None else linear.bias


    def direct_call(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What a plan (:mod:`bnnslim.runtime.segments`) may call in place of this module on the kernels: the op
        with the weight and bias bound for 4-d float32 CPU inputs without autograd, ``forward`` otherwise."""
        ops = build.available_ops()
        if ops is None:
            return None
        op, weight, bias, channels, forward = ops.pooled_linear, self.weight, self.bias, self.channels, self.forward

        def run(x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 4 and x.dtype is torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled():
                return op(x, weight, bias, channels)
            return forward(x)

        return run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = build.available_ops()
        if ops is not None and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() \
                and (x.dim() == 4 or (x.dim() == 2 and self.channels and x.shape[1] % self.channels == 0)):
            return ops.pooled_linear(x, self.weight, self.bias, self.channels)
        pooled = position_mean(x.flatten(2) if x.dim() == 4 else x.reshape(x.shape[0], self.channels, -1))
        return pooled if self.weight is None else F.linear(pooled, self.weight.flatten(1), self.bias)

    def extra_repr(self) -> str:
        if self.weight is None:
            return "global average pooling"
        kind = "a 1x1 conv as a linear layer, " if self.weight.dim() == 4 else ""
        return f"global average pooling, then {kind}in_features={self.channels}, " \
               f"out_features={self.weight.shape[0]}, bias={self.bias is not None}"


def _global_pool(m: nn.Module | None) -> bool:
    return type(m) is nn.AdaptiveAvgPool2d and m.output_size in (1, (1, 1), [1, 1])


def _flatten_module(m: nn.Module | None) -> bool:
    return type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1


def _pointwise_conv(m: nn.Module | None) -> TypeGuard[nn.Conv2d]:
    """A real 1x1 conv that maps every position alone (stride 1, no padding, one group): it commutes with the mean."""
    return type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1 \
        and m.padding in ((0, 0), "valid", "same")


def _flatten_call(node: fx.Node) -> bool:
    """``torch.flatten(x, 1)`` or ``x.flatten(1)`` (to the last dimension)."""
    if (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return bool(start == 1 and end == -1)
    return False


def fold_pooled_tails(model: nn.Module, graph: fx.Graph) -> dict[str, list[str]]:
    """Fold each global average pooling -> flatten (-> linear) of ``model`` into a :class:`PooledLinear` (in
    place), ``graph`` being its trace from :func:`bnnslim.runtime.fuse.fuse_binary_chains` (which leaves these
    layers as they were); returns {the layer that computes it: the layers folded into it}. A layer called more
    than once is left as it is."""
    modules = dict(model.named_modules(remove_duplicate=False))
    calls = Counter(id(modules[str(n.target)]) for n in graph.nodes if n.op == "call_module")

    def module(node: object) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            m = modules[str(node.target)]
            return m if calls[id(m)] == 1 else None
        return None

    folded: dict[str, list[str]] = {}
    for pool in graph.nodes:
        if not _global_pool(module(pool)) or len(pool.users) != 1:
            continue
        flat = next(iter(pool.users))
        if flat.args[:1] != (pool,) or not (_flatten_module(module(flat)) or _flatten_call(flat)):
            continue
        linear = next(iter(flat.users)) if len(flat.users) == 1 else None
        lin = module(linear)
        source = pool.args[0]
        pointwise = module(source) if isinstance(source, fx.Node) and len(source.users) == 1 else None
        pool_and_flatten = [pool] + ([flat] if flat.op == "call_module" else [])  # both pass their input on
        if type(lin) is nn.Linear and linear is not None and linear.args == (flat,) and not linear.kwargs:
            assert isinstance(lin, nn.Linear)
            into, layer, parts = str(linear.target), PooledLinear(lin), pool_and_flatten
        elif _pointwise_conv(pointwise):
            assert isinstance(source, fx.Node)
            into, layer, parts = str(source.target), PooledLinear(pointwise), pool_and_flatten
        elif flat.op == "call_module":
            into, layer, parts = str(flat.target), PooledLinear(None), [pool]
        else:
            continue
        for part in parts:
            _set_submodule(model, str(part.target), FoldedAway(modules[str(part.target)], into, "the pooled layer"))
        _set_submodule(model, into, layer)
        folded[into] = [str(p.target) for p in parts]
    return folded

