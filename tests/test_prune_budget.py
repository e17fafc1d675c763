"""The exact global budget."""

from __future__ import annotations

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


def test_learned_proposals_shape_the_split() -> None:
    groups = [group("a", 64), group("b", 64)]
    budget = Budget(groups, 0.5)
    assert budget.choose(50) == 50  # the first group keeps what it learned
    assert budget.choose(50) == 14  # the last one makes up the exact remainder
    assert budget.kept == 64


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
