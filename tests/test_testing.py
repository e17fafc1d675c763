"""bnnslim.testing: a plugin author tests a strategy in-process, with the context prune builds."""

from __future__ import annotations

import types

import torch

from bnnslim.hookspecs import hookimpl
from bnnslim.plugin_types import Selection, StrategySpec
from bnnslim.plugins import get_strategy, strategies
from bnnslim.testing import plugins_registered, selection_context, tiny_binary_model


def test_context_of_a_later_group_has_the_earlier_masks_applied() -> None:
    ctx = selection_context(group=1, keep=0.5)
    assert ctx.group.id == "3.0"
    first = tiny_binary_model().get_submodule("1.0").out_channels
    mask = ctx.masks.fixed_masks()["1.0"]
    assert mask.numel() == first and 0 < int(mask.sum()) < first
    x, y = next(ctx.batches)
    assert x.shape[1:] == (1, 28, 28) and y.shape == (x.shape[0],)
    assert ctx.teacher is not None
    loss = ctx.objective(ctx.model(x), y, x)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_builtin_strategies_answer_on_the_context() -> None:
    for name in ("bn", "subsidiary"):
        ctx = selection_context(group=0, steps=3)
        selection = get_strategy(name).select(ctx)
        assert selection.scores.shape == (ctx.group.size,)


def test_a_plugin_strategy_is_registered_for_the_block_only() -> None:
    plugin = types.SimpleNamespace()

    @hookimpl
    def bnnslim_strategies():  # type: ignore[no-untyped-def]
        yield StrategySpec("first-half", "keeps the first channels",
                           lambda ctx: Selection(scores=-torch.arange(ctx.group.size, dtype=torch.float32)))

    plugin.bnnslim_strategies = bnnslim_strategies
    with plugins_registered(plugin):
        ctx = selection_context()
        scores = get_strategy("first-half").select(ctx).scores
        assert int(scores.argmax()) == 0
    assert "first-half" not in strategies()
