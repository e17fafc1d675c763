"""The FPGM rule: distances to the geometric median, and what a group's filters are."""

from __future__ import annotations

import itertools

import pytest
import torch
from bnnslim_fpgm.rule import geometric_median_distance, group_filters, select_fpgm, select_fpgm_binary
from torch import nn

from bnnslim.binary.convert import apply_binarization, plan_binarization
from bnnslim.default_plugins.schemes import bnnslim_schemes
from bnnslim.graph import build_graph
from bnnslim.plugin_types import SelectionContext
from bnnslim.prune.groups import find_groups
from bnnslim.prune.masking import MaskController

torch.set_num_threads(1)  # tiny tensors: a second thread only waits for a core on a shared machine


def test_the_filter_nearest_the_median_scores_lowest() -> None:
    filters = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    d = geometric_median_distance(filters)
    assert d.tolist() == [16.0, 13.0, 12.0, 13.0, 34.0]
    assert int(d.argmin()) == 2  # the median is the most redundant filter


def test_fpgm_ignores_the_norm_unlike_norm_based_rules() -> None:
    g = torch.Generator().manual_seed(0)
    filters = torch.randn(6, 18, generator=g)
    shifted = filters + 5.0  # every filter far larger in norm, their geometry unchanged
    assert torch.allclose(geometric_median_distance(filters), geometric_median_distance(shifted), atol=1e-4)
    assert not torch.equal(filters.norm(dim=1).argsort(), shifted.norm(dim=1).argsort())


def test_a_duplicated_filter_is_among_the_first_removed() -> None:
    g = torch.Generator().manual_seed(1)
    filters = torch.randn(8, 9, generator=g)
    filters[5] = filters[2]  # two copies: each is close to the other, so both are near the "centre"
    centre = filters.mean(0, keepdim=True)
    filters[2] = filters[5] = centre.squeeze(0) + 0.01
    order = geometric_median_distance(filters).argsort().tolist()
    assert set(order[:2]) == {2, 5}


def _context() -> tuple[SelectionContext, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.Hardtanh(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.Hardtanh(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.Hardtanh(),
        nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    example = torch.randn(2, 1, 8, 8)
    xnor = next(s for s in bnnslim_schemes() if s.name == "xnor")
    apply_binarization(model, plan_binarization(model, example).binary, xnor)
    groups = find_groups(model, build_graph(model, example, pruners={}), example).groups
    masks = MaskController(model, groups)
    data = [(torch.randn(4, 1, 8, 8), torch.randint(0, 4, (4,)))]
    ctx = SelectionContext(model=model, group=groups[1], masks=masks, suggested_keep=3,
                           batches=itertools.cycle(data), heldout=data[0], steps=0, lr=0.0, penalty=0.0,
                           generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    masks.set_fixed(groups[0].id, torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0]))  # inputs 2 and 4 are gone
    return ctx, model


def test_removed_input_channels_do_not_count() -> None:
    ctx, model = _context()
    before = select_fpgm(ctx).scores
    conv = model.get_submodule(ctx.group.id)
    with torch.no_grad():
        conv.weight[:, [2, 4]] = torch.randn(6, 2, 3, 3) * 10  # weights on removed inputs change
    assert torch.allclose(select_fpgm(ctx).scores, before)
    assert group_filters(ctx)[:, 2 * 9:3 * 9].abs().sum() == 0


@pytest.mark.parametrize("select", [select_fpgm, select_fpgm_binary])
def test_selection_has_one_finite_score_per_channel(select) -> None:  # type: ignore[no-untyped-def]
    ctx, _ = _context()
    selection = select(ctx)
    assert selection.scores.shape == (ctx.group.size,) and torch.isfinite(selection.scores).all()
    assert selection.keep is None and torch.equal(selection.state["fpgm_distance"], selection.scores)


def test_binary_variant_measures_the_filters_the_layer_computes_with() -> None:
    ctx, model = _context()
    ctx.masks.clear(next(iter(ctx.masks.groups)))  # no removed inputs
    conv = model.get_submodule(ctx.group.id)
    conv.input_mask = None
    with torch.no_grad():
        expected = geometric_median_distance(conv.binary_weight().flatten(1))
    assert torch.allclose(select_fpgm_binary(ctx).scores, expected)
