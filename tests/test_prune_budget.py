"""The exact global budget."""

from __future__ import annotations

import math

import pytest

from bnnslim.errors import BnnslimError
from bnnslim.prune.budget import Budget, allowed_counts
from bnnslim.prune.groups import PrunableGroup


def group(name: str, size: int, producers: int = 1) -> PrunableGroup:
    return PrunableGroup(id=name, size=size, producers=tuple(f"{name}.{i}" for i in range(producers)),
                         consumers=(), order=0)


def test_allowed_counts_respect_floor_and_rounding() -> None:
    assert allowed_counts(10, 0.1, 1) == list(range(1, 11))
    assert allowed_counts(20, 0.25, 4) == [8, 12, 16, 20]
    assert allowed_counts(10, 0.0, 4) == [4, 8, 10]  # the full count is always allowed


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.77, 0.8, 1.0])
@pytest.mark.parametrize("proposals", ["low", "high", "uniform"])
def test_total_lands_exactly_on_target_whatever_the_proposals(keep: float, proposals: str) -> None:
    groups = [group("a", 16), group("b", 32, producers=3), group("c", 32), group("d", 64)]
    budget = Budget(groups, keep)
    for g in groups:
        proposed = {"low": 0, "high": g.size, "uniform": budget.suggestion()}[proposals]
        k = budget.choose(proposed)
        assert k >= 2 or g.size < 20  # the 10% floor
    assert budget.kept == budget.requested == round(keep * budget.total)


def test_without_a_band_the_last_group_absorbs_the_rest() -> None:
    groups = [group("a", 64), group("b", 64)]
    budget = Budget(groups, 0.5)
    assert budget.choose(50) == 50  # the first group keeps what it learned
    assert budget.choose(50) == 14  # the last one makes up the exact remainder (the starvation of issue 11)
    assert budget.kept == 64


def test_learned_proposals_shape_the_split_inside_the_band() -> None:
    groups = [group("a", 64), group("b", 64)]
    budget = Budget(groups, 0.5, max_shift=0.25)
    assert budget.choose(50) == 40  # at most 1.25 x its uniform share of 32
    assert budget.choose(50) == 24  # the rest, and never below 0.75 x 32
    assert budget.kept == 64
    budget = Budget(groups, 0.5, max_shift=0.25)
    assert budget.choose(35) == 35  # inside the band a proposal is honoured
    assert budget.choose(35) == 29


@pytest.mark.parametrize("max_shift", [0.0, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("keep", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("proposals", ["all", "none", "alternate"])
def test_no_group_is_starved_below_its_band_whatever_earlier_groups_propose(max_shift, keep, proposals) -> None:
    groups = [group("a", 16), group("b", 32), group("c", 64, producers=2), group("d", 64), group("e", 48)]
    budget = Budget(groups, keep, max_shift=max_shift)
    counts = []
    for i, g in enumerate(groups):
        proposed = {"all": g.size, "none": 0, "alternate": g.size if i % 2 else 0}[proposals]
        counts.append(budget.choose(proposed))
    assert budget.kept == budget.requested == round(keep * budget.total)  # still exact
    for g, k in zip(groups, counts, strict=True):
        share = budget.uniform_share(groups.index(g))
        assert share * (1 - max_shift) - 1 <= k <= share * (1 + max_shift) + 1, (g.id, k, share)
        assert k >= math.ceil(share * (1 - max_shift) - 1e-9) or k == min(budget.allowed[groups.index(g)])


def test_uniform_share_is_the_common_fraction() -> None:
    groups = [group("a", 16), group("b", 32, producers=3)]
    budget = Budget(groups, 0.5, max_shift=0.0)
    assert budget.fraction == pytest.approx(0.5, abs=1e-6)
    assert [budget.choose(0), budget.choose(0)] == [8, 16]


def test_unreachable_target_goes_to_nearest_reachable_total() -> None:
    groups = [group("res", 10, producers=3)]  # totals are multiples of 3
    budget = Budget(groups, 0.5)  # asks for 15
    assert budget.requested == 15
    assert budget.target in (15,)
    budget2 = Budget([group("res", 10, producers=4)], 0.5)  # asks 20 of 40 -> 20 reachable (k=5)
    assert budget2.target == 20
    budget3 = Budget([group("res", 10, producers=3)], 0.55)  # asks 16.5 -> 16, nearest multiple of 3 is 15
    assert budget3.requested == 16 and budget3.target == 15


def test_round_to_keeps_multiples() -> None:
    groups = [group("a", 32), group("b", 32), group("c", 64)]
    budget = Budget(groups, 0.5, round_to=8)
    counts = [budget.choose(budget.suggestion()) for _ in groups]
    assert all(k % 8 == 0 for k in counts)
    assert budget.kept == 64


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.01])
def test_keep_outside_unit_interval_is_rejected(keep: float) -> None:
    with pytest.raises(BnnslimError, match="outside"):
        Budget([group("a", 8)], keep)


def test_keep_below_the_floor_is_rejected_with_the_minimum() -> None:
    with pytest.raises(BnnslimError, match="at least"):
        Budget([group("a", 100), group("b", 100)], 0.05, min_keep=0.1)


def test_keep_below_the_floor_blames_min_keep() -> None:
    with pytest.raises(BnnslimError, match="--min-keep") as info:
        Budget([group("a", 100), group("b", 100)], 0.05, min_keep=0.1)
    assert "--round-to" not in str(info.value)


def test_rounding_that_leaves_no_count_blames_round_to_not_min_keep() -> None:
    """``--round-to 1000`` on layers of 32 and 64 filters: only whole layers are left, and the message says why."""
    with pytest.raises(BnnslimError) as info:
        Budget([group("a", 32), group("b", 64)], 0.5, round_to=1000)
    message, hint = info.value.problem, info.value.fix or ""
    assert "--round-to 1000" in message and "smaller than 1000 filters" in message
    assert "lower --round-to" in hint and "--min-keep" not in hint


@pytest.mark.parametrize("arch", ["plain", "residual", "concat"])
@pytest.mark.parametrize("measure", ["ops", "params"])
@pytest.mark.parametrize("keep", [0.3, 0.6])
def test_ops_and_params_budgets_count_what_the_export_report_counts(arch: str, measure: str, keep: float) -> None:
    import copy

    import torch
    from _models import MODELS

    from bnnslim.prune.slim import slim
    from bnnslim.report import layer_costs

    b = MODELS[arch]()
    key = "binary_ops" if measure == "ops" else "params"
    report_total = sum(getattr(c, key) for c in layer_costs(b.model, b.example).values())
    budget = Budget(b.groups, keep, measure=measure, model=b.model, example=b.example, max_shift=0.5)
    assert budget.total == report_total
    g = torch.Generator().manual_seed(0)
    counts = [budget.choose(int(torch.randint(0, grp.size + 1, (1,), generator=g))) for grp in b.groups]
    masks = {grp.id: (torch.arange(grp.size) < k).float() for grp, k in zip(b.groups, counts, strict=True)}
    slim_model = copy.deepcopy(b.model)
    slim(slim_model, b.groups, masks, b.example)
    after = sum(getattr(c, key) for c in layer_costs(slim_model, b.example).values())
    assert after == budget.spent  # the budget's count is the report's count of the slim model
    assert after <= budget.requested  # never over the budget ...
    last = list(counts)
    last[-1] += 1  # ... and short of it by less than one more channel of the last group
    if last[-1] <= b.groups[-1].size:
        assert budget.costs.cost(last) > budget.requested


def test_an_ops_budget_below_what_the_floors_allow_is_refused() -> None:
    from _models import MODELS

    b = MODELS["plain"]()
    with pytest.raises(BnnslimError, match="binary operations"):
        Budget(b.groups, 0.001, measure="ops", model=b.model, example=b.example)
