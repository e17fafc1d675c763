"""Subsidiary selectors and rule-based strategies, group by group."""

from __future__ import annotations

import itertools

import pytest
import torch
from _models import MODELS

from bnnslim.binary.convert import forward_order
from bnnslim.errors import BnnslimError
from bnnslim.plugin_types import Selection, SelectionContext
from bnnslim.plugins import get_strategy, strategies, validate_selection
from bnnslim.prune.masking import MaskController
from bnnslim.prune.schedule import retrain
from bnnslim.prune.subsidiary import selector_mask


def test_selector_mask_is_a_step_with_straight_through_gradient() -> None:
    s = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    m = selector_mask(s)
    assert m.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    m.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert s.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]  # 1{|s| < 1}


def _context(arch: str = "plain", group_index: int = 0, steps: int = 5):
    b = MODELS[arch]()
    g = torch.Generator().manual_seed(0)
    shape = b.example.shape[1:]
    data = [(torch.randn(8, *shape, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    controller = MaskController(b.model, b.groups)
    grp = b.groups[group_index]
    ctx = SelectionContext(model=b.model, group=grp, masks=controller, suggested_keep=grp.size // 2,
                           batches=itertools.cycle(data), heldout=data[0], steps=steps, lr=0.05, penalty=1.0,
                           generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    return b, ctx


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_selector_learning_changes_only_the_selectors() -> None:
    b, ctx = _context(steps=8)
    before = _snapshot(b.model)
    b.model.train()  # even from train mode, BN statistics must not move in step (a)
    selection = get_strategy("subsidiary").select(ctx)
    after = _snapshot(b.model)
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed during selector learning"
    selector = selection.state["selector"]
    assert selector.shape == (ctx.group.size,)
    assert not torch.allclose(selector, torch.full_like(selector, 0.1)), "selectors did not learn"
    assert all(p.requires_grad for p in b.model.parameters()), "parameters left frozen"
    assert b.model.training, "train mode not restored"
    assert ctx.masks.fixed_masks() == {}, "the selector's mask was left installed"


def test_retraining_leaves_masks_and_lower_layers_alone() -> None:
    b, ctx = _context("residual", group_index=3)
    controller = ctx.masks
    decided = {g.id: (torch.arange(g.size) % 2).float() for g in b.groups[:4]}
    for gid, m in decided.items():
        controller.set_fixed(gid, m)
    order = forward_order(b.model, b.example)
    group = b.groups[3]
    lower = {n for n, i in order.items() if i < group.order}
    before = _snapshot(b.model)
    retrain(b.model, group, order, ctx.batches, steps=3, lr=0.01)
    after = _snapshot(b.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "retraining changed nothing"
    for k in changed:
        module = k.rsplit(".", 1)[0]
        assert module not in lower, f"{k} is below the group and must stay fixed"
    assert controller.fixed_masks().keys() == decided.keys()
    for gid, m in controller.fixed_masks().items():
        assert torch.equal(m, decided[gid]), "a decided mask changed during retraining"


@pytest.mark.parametrize("name", ["subsidiary", "l1", "alpha", "bn", "random", "greedy"])
@pytest.mark.parametrize("arch", ["plain", "residual", "concat"])
def test_every_builtin_strategy_returns_a_valid_selection(name: str, arch: str) -> None:
    _b, ctx = _context(arch, group_index=1, steps=3)
    spec = get_strategy(name)
    selection = validate_selection(spec.select(ctx), spec, ctx.group)
    assert selection.scores.shape == (ctx.group.size,)
    assert torch.isfinite(selection.scores).all()
    assert selection.keep is None or 0 <= selection.keep <= ctx.group.size
    assert ctx.masks.fixed_masks() == {}


def test_greedy_removes_the_channels_that_hurt_least() -> None:
    b, ctx = _context("plain", group_index=0)
    selection = get_strategy("greedy").select(ctx)
    removed_first = int(selection.scores.argmin())
    x, y = ctx.heldout
    losses = []
    for c in range(ctx.group.size):
        m = torch.ones(ctx.group.size)
        m[c] = 0
        ctx.masks.set_fixed(ctx.group.id, m)
        with torch.no_grad():
            b.model.eval()
            losses.append(torch.nn.functional.cross_entropy(b.model(x), y).item())
    assert removed_first == min(range(len(losses)), key=losses.__getitem__)


def test_builtin_strategies_are_registered() -> None:
    assert {"subsidiary", "l1", "alpha", "bn", "random", "greedy"} <= set(strategies())


@pytest.mark.parametrize("bad, message", [
    (Selection(scores=torch.ones(3)), "3 scores"),
    (Selection(scores=torch.full((16,), float("nan"))), "non-finite"),
    (Selection(scores=torch.ones(16), keep=99), "proposed keeping 99"),
    ("nonsense", "not a Selection"),
])
def test_invalid_selections_are_rejected_naming_the_strategy(bad, message: str) -> None:
    _b, ctx = _context("plain")
    spec = get_strategy("random")
    with pytest.raises(BnnslimError, match=message) as info:
        validate_selection(bad, spec, ctx.group)
    assert "strategy 'random'" in str(info.value)


def test_learned_selection_keeps_the_informative_channels_and_drops_the_noise() -> None:
    """A toy net whose binary layer has 4 informative channels and 4 that only add noise.

    The noise channels have the largest BatchNorm scales, so the ``bn`` rule keeps
    them; the learned selectors must find the informative ones.
    """
    from _helpers import builtin_scheme, toy_splits
    from torch import nn
    from torch.utils.data import DataLoader

    from bnnslim.binary.convert import apply_binarization
    from bnnslim.graph import build_graph
    from bnnslim.prune.groups import find_groups
    from bnnslim.train import fit

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))
    apply_binarization(model, ["3"], builtin_scheme("xnor"))
    example = torch.randn(2, 1, 8, 8)
    groups = find_groups(model, build_graph(model, example), example).groups
    group = next(g for g in groups if g.id == "3")
    controller = MaskController(model, groups)
    informative = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0])
    controller.set_fixed("3", informative)  # the network learns to use channels 0-3 only
    splits = toy_splits(n_train=512)
    fit(model, DataLoader(splits.train, batch_size=32, shuffle=True), epochs=4, lr=1e-2)
    controller.clear("3")
    with torch.no_grad():  # channels 4-7: large BN scale, random small read-out: noise
        model[4].weight[4:] = 3.0
        model[4].weight[:4] = model[4].weight[:4].clamp(max=0.5)
        noise = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.3
        model[8].weight.view(4, 8, 4)[:, 4:, :] = noise
    data = [(x, y) for x, y in DataLoader(splits.train, batch_size=64, shuffle=True)]
    ctx = SelectionContext(model=model, group=group, masks=controller, suggested_keep=4,
                           batches=itertools.cycle(data), heldout=data[0], steps=30, lr=0.005, penalty=1.0,
                           generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    learned = get_strategy("subsidiary").select(ctx)
    assert set(torch.topk(learned.scores, 4).indices.tolist()) == {0, 1, 2, 3}
    rule = get_strategy("bn").select(ctx)
    assert set(torch.topk(rule.scores, 4).indices.tolist()) == {4, 5, 6, 7}  # the rule is fooled
