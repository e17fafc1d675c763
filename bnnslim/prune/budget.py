"""Exact global budgets: how many channels each group keeps.

``--keep F`` asks for ``T = round(F * N)`` filters, ``N`` the filters of all
prunable groups (see ``groups.py`` for what is counted). Group ``g`` has ``n_g``
channels, each worth ``w_g`` filters (its producers). Each group may keep a
count from an allowed set: at least the floor ``max(1, ceil(min_keep * n_g))``,
at most ``n_g``, and a multiple of ``round_to`` (or all ``n_g``).

Groups are decided one at a time, bottom-up. The strategy proposes a count
(learned, for the subsidiary selectors); :meth:`Budget.choose` takes the allowed
count nearest to it for which the *remaining* groups can still make up the rest
exactly, checked with a subset-sum over the allowed counts (a bitset). So the
split between layers is learned while the total lands on target. When no
combination hits ``T`` exactly (weights > 1, ``round_to``), the nearest reachable
total is the target and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bnnslim.errors import BnnslimError
from bnnslim.prune.groups import PrunableGroup


def allowed_counts(size: int, min_keep: float, round_to: int) -> list[int]:
    """Channel counts a group of ``size`` may keep."""
    floor = max(1, math.ceil(min_keep * size))
    counts = [k for k in range(floor, size + 1) if k % round_to == 0 or k == size]
    return counts


def _reachable(groups: list[tuple[int, list[int]]]) -> list[int]:
    """reach[i]: bitset of totals the groups i.. can make (bit t set = total t reachable)."""
    reach = [0] * (len(groups) + 1)
    reach[-1] = 1
    for i in range(len(groups) - 1, -1, -1):
        weight, counts = groups[i]
        acc = 0
        nxt = reach[i + 1]
        for k in counts:
            acc |= nxt << (weight * k)
        reach[i] = acc
    return reach


@dataclass
class Budget:
    """Tracks the filters left to give while groups are decided in order."""

    groups: list[PrunableGroup]
    keep: float
    min_keep: float = 0.1
    round_to: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise BnnslimError(f"--keep {self.keep} is outside (0, 1]", "give the fraction of filters to keep, e.g. 0.8")
        if self.round_to < 1:
            raise BnnslimError(f"--round-to {self.round_to} must be at least 1", "use 1 for no rounding")
        self.allowed = [allowed_counts(g.size, self.min_keep, self.round_to) for g in self.groups]
        self.weights = [g.filters_per_channel for g in self.groups]
        self._reach = _reachable(list(zip(self.weights, self.allowed)))
        self.total = sum(g.filters for g in self.groups)
        self.requested = round(self.keep * self.total)
        minimum = sum(w * a[0] for w, a in zip(self.weights, self.allowed))
        if self.requested < minimum:
            raise BnnslimError(
                f"--keep {self.keep} asks for {self.requested} of {self.total} filters, but every layer must keep at "
                f"least {self.min_keep:.0%} of its filters ({minimum} in all)",
                f"raise --keep to at least {math.ceil(1000 * minimum / self.total) / 1000} or lower --min-keep")
        self.target = self._nearest_reachable(self._reach[0], self.requested)
        self.remaining = self.target
        self.decided: list[int] = []

    @staticmethod
    def _nearest_reachable(bits: int, t: int) -> int:
        for d in range(0, max(t, bits.bit_length()) + 1):
            for cand in (t - d, t + d):
                if cand >= 0 and (bits >> cand) & 1:
                    return cand
        raise BnnslimError("no channel counts satisfy the budget", "lower --round-to or --min-keep")

    def suggestion(self) -> int:
        """A uniform share for the next group: its channels times the fraction still to keep."""
        i = len(self.decided)
        left = sum(g.filters for g in self.groups[i:])
        frac = self.remaining / left if left else 1.0
        return max(1, min(self.groups[i].size, round(frac * self.groups[i].size)))

    def choose(self, proposed: int) -> int:
        """Decide the next group's count: the allowed count nearest ``proposed`` that keeps the target reachable."""
        i = len(self.decided)
        w = self.weights[i]
        feasible = [k for k in self.allowed[i]
                    if self.remaining - w * k >= 0 and (self._reach[i + 1] >> (self.remaining - w * k)) & 1]
        if not feasible:  # cannot happen: the target was chosen reachable
            raise BnnslimError("the budget became unreachable", "report this as a bug")
        k = min(feasible, key=lambda c: (abs(c - proposed), -c))
        self.decided.append(k)
        self.remaining -= w * k
        return k

    def replay(self, counts: list[int]) -> None:
        """Re-apply decisions from an interrupted run."""
        for k in counts:
            self.decided.append(k)
            self.remaining -= self.weights[len(self.decided) - 1] * k

    @property
    def kept(self) -> int:
        return sum(w * k for w, k in zip(self.weights, self.decided))
