"""Tracing a model's channel dependencies with torch-pruning.

torch-pruning's ``DependencyGraph`` records which layers' channels are coupled
(a conv and its BatchNorm, the next layer's inputs, residual adds, concats,
flatten -> linear). bnnslim builds one graph per model and uses it to find
prunable groups and to slim. This module turns torch-pruning's silent failure
modes into errors (see ``shared/notes/torch-pruning.md`` in the project notes).

Layers torch-pruning does not know get their pruner from plugins (the
``bnnslim_pruners`` hook), passed as ``customized_pruners``; a layer that owns
parameters no pruner covers is an error naming the layer and the hook.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch_pruning as tp
from torch import nn

from bnnslim.errors import BnnslimError


def build_graph(model: nn.Module, example: torch.Tensor,
                pruners: Mapping[type, tp.pruner.BasePruningFunc] | None = None) -> tp.DependencyGraph:
    """Trace ``model`` on ``example`` (a batch) and return its dependency graph.

    ``pruners`` maps custom layer types to their torch-pruning pruner; by default
    the ones plugins provide. Raises when the model cannot be traced, or when a
    module owns a parameter that no pruner knows how to slice (torch-pruning would
    slice it on a wrong dimension and break the model later). The model's
    train/eval mode is kept.
    """
    if pruners is None:
        from bnnslim.plugins import customized_pruners

        pruners = customized_pruners()
    was_training = model.training
    graph = tp.DependencyGraph()
    try:
        with warnings.catch_warnings():
            # torch-pruning warns about unwrapped parameters (checked below) and unknown ops: none reaches the user
            warnings.simplefilter("ignore")
            graph.build_dependency(model, example_inputs=example, verbose=False, customized_pruners=dict(pruners))
    except BnnslimError:
        raise
    except Exception as exc:
        raise _trace_error(model, graph, example, exc) from exc
    finally:
        model.train(was_training)
    if graph.unwrapped_parameters:  # found by torch-pruning; parameters without a dimension > 1 are not listed
        raise _unwrapped_error(model, graph)
    return graph


def _unwrapped_error(model: nn.Module, graph: tp.DependencyGraph) -> BnnslimError:
    """Name the modules that own parameters torch-pruning cannot slice, and the hook that fixes it."""
    names = {id(p): n for n, p in model.named_parameters()}
    owners: dict[str, list[str]] = {}
    for up in graph.unwrapped_parameters:
        name = names.get(id(up.parameters), "?")
        module, _, _param = name.rpartition(".")
        owners.setdefault(module, []).append(name)
    modules = dict(model.named_modules())
    parts = []
    for module, params in owners.items():
        kind = type(modules[module]).__name__ if module in modules else "?"
        where = f"module '{module}' ({kind})" if module else f"the model itself ({kind})"
        parts.append(f"{where} owns {', '.join(params)}")
    types = sorted({type(modules[m]).__name__ for m in owners if m in modules})
    return BnnslimError(
        "torch-pruning does not know how to slice parameters outside standard layers: " + "; ".join(parts),
        f"register a pruner for {' and '.join(types) or 'that layer'} with the bnnslim_pruners plugin hook "
        "(docs/plugins.md), or build the layer from standard ones",
    )


def _trace_error(model: nn.Module, graph: tp.DependencyGraph, example: torch.Tensor, exc: Exception) -> BnnslimError:
    """Say whether the model itself fails on the input, or torch-pruning fails on a part of it."""
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as own:
        return BnnslimError(
            f"the model fails on an input of shape {tuple(example.shape)}: {type(own).__name__}: {own}",
            "check that the model runs on that input (set --input-shape or INPUT_SHAPE in the model file)")
    names = {m: n for n, m in model.named_modules()}
    reshapes = [node for node in getattr(graph, "module2node", {}).values() if node.type == tp.ops.OPTYPE.RESHAPE]
    after = sorted({n for node in reshapes for n in _named_producers(node, names)})
    where = (f" at a reshape after layer {', '.join(repr(a) for a in after[:3])} (a channel shuffle or view)"
             if after else "")
    return BnnslimError(
        f"torch-pruning {_tp_version()} cannot trace the channel dependencies of this model{where}: "
        f"{type(exc).__name__}: {exc}",
        "bnnslim cannot prune it as it is: replace that reshape by standard layers, or register a pruner for a "
        "custom layer that wraps it with the bnnslim_pruners plugin hook (docs/plugins.md)")


def _named_producers(node: object, names: dict[object, str], depth: int = 8) -> set[str]:
    """The nearest named layers that feed ``node`` (through unnamed ops such as cat or transpose)."""
    found: set[str] = set()
    for i in getattr(node, "inputs", []):
        if i.module in names:
            found.add(names[i.module])
        elif depth > 0:
            found |= _named_producers(i, names, depth - 1)
    return found


def _tp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")  # tp.__version__ says 1.6.0 in the 1.6.1 wheel
    except PackageNotFoundError:
        return tp.__version__
