"""Structural slimming: remove masked channels for real, with everything coupled to them, and find
where a slim model stops computing what its masked original computes."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from bnnslim.errors import BnnslimError
from bnnslim.graph import build_graph
from bnnslim.modes import evaluating
from bnnslim.prune.groups import PrunableGroup
from bnnslim.prune.masking import MaskController

#: Slim and masked outputs may differ by float rounding only.
TOLERANCE = 1e-4


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


def _outputs_by_layer(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: outs.__setitem__(n, o.detach()))
               for n, m in model.named_modules() if n and not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


def first_divergence(masked: nn.Module, slim_model: nn.Module, groups: list[PrunableGroup],
                     masks: dict[str, torch.Tensor], x: torch.Tensor) -> str:
    """The first layer (in forward order) whose slim output differs from the masked one on kept channels."""
    a, b = _outputs_by_layer(masked, x), _outputs_by_layer(slim_model, x)
    kept_of: dict[str, torch.Tensor] = {}
    for g in groups:
        if g.id in masks:
            for n in (*g.producers, *g.norms):
                kept_of[n] = masks[g.id].nonzero().flatten()
    for name, out in a.items():
        other = b.get(name)
        if other is None or not isinstance(out, torch.Tensor):
            continue
        if out.shape != other.shape:
            if name not in kept_of or out.dim() < 2:
                continue
            out = out.index_select(1, kept_of[name])
            if out.shape != other.shape:
                return name
        if not torch.allclose(out, other, rtol=TOLERANCE, atol=TOLERANCE):
            return name
    return "the model output"


def checked_slim(model: nn.Module, groups: list[PrunableGroup], masks: Mapping[str, torch.Tensor],
                 example: torch.Tensor) -> tuple[nn.Module, float]:
    """A slim copy of ``model`` (eval mode) that must compute what ``model`` computes with ``masks`` applied at
    every consumer; returns it with the largest output difference on ``example``.

    Raises :class:`BnnslimError` naming the first layer that diverges. ``model``
    is left as it was (its masks are removed again).
    """
    unknown = sorted(set(masks) - {g.id for g in groups})
    if unknown:
        raise BnnslimError(f"masks name '{unknown[0]}', which is not a prunable group of this model",
                           "use the masks learned for this model (rerun `bnnslim prune` or learn_masks)")
    fixed = {k: torch.as_tensor(v).detach().flatten().cpu() for k, v in masks.items()}
    with evaluating(model):
        controller = _masked(model, groups, fixed)
        try:
            with torch.no_grad():
                expected = model(example)
            controller.remove()  # before copying: the slim copy must carry no mask hooks
            slim_model = copy.deepcopy(model)  # in eval mode, as the model is here
            slim(slim_model, groups, fixed, example)
            with torch.no_grad():
                got = slim_model(example)
            difference = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE):
                controller = _masked(model, groups, fixed)
                layer = first_divergence(model, slim_model, groups, fixed, example)
                raise BnnslimError(
                    f"the slimmed model differs from the masked model (max difference {difference:.3g}), first at "
                    f"layer '{layer}'",
                    "that layer mixes channels in a way torch-pruning cannot slice: exclude it (`bnnslim prune "
                    "--exclude`, or exclude= in Python), or register a custom pruner for it through a plugin")
        finally:
            controller.remove()
    return slim_model, difference


def _masked(model: nn.Module, groups: list[PrunableGroup], masks: dict[str, torch.Tensor]) -> MaskController:
    """``masks`` applied to ``model`` at every consumer of their groups, until ``.remove()``."""
    controller = MaskController(model, groups)
    for gid, m in masks.items():
        controller.set_fixed(gid, m)
    return controller
