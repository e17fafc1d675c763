"""Global budgets: how many channels each group keeps.

What ``--keep F`` counts (``--budget``):

- ``filters`` (default): the output filters of the binary convs that produce
  prunable groups (see ``groups.py``). ``F`` asks for ``T = round(F * N)`` of
  the ``N`` such filters; group ``g`` has ``n_g`` channels, each worth ``w_g``
  filters (its producers). The total lands on ``T`` exactly (a subset-sum over
  the allowed counts), or on the nearest reachable total when layer sizes make
  ``T`` unreachable.
- ``ops``: the binary operations (XNOR-popcount) of one image through the
  whole model, and ``params``: the weights of every conv and linear layer,
  both counted exactly as the export report counts them
  (:func:`bnnslim.report.layer_costs`). A layer's count is bilinear in the
  channels kept on its input and output side, so the result lands at or below
  ``F`` times the unpruned count, short of it by less than what one more
  channel of the last group would cost.

Each group may keep a count from an allowed set: at least the floor
``max(1, ceil(min_keep * n_g))``, at most ``n_g``, a multiple of ``round_to``
(or all ``n_g``), and, when ``max_shift`` is given, within ``max_shift`` of the
group's **uniform share** ``f * n_g`` (``f`` the one fraction that, kept by
every group, meets the budget). That band is what keeps a learned split from
starving a layer: whatever earlier groups propose, no group ends below
``(1 - max_shift)`` of its uniform share (nor above ``1 + max_shift``), because
a count is only accepted if the groups after it can still meet the budget
inside their bands. Groups are decided one at a time, bottom-up: the strategy
proposes a count, :meth:`Budget.choose` takes the feasible count nearest to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from bnnslim.errors import BnnslimError
from bnnslim.prune.groups import PrunableGroup

MEASURES = ("filters", "ops", "params")


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


@dataclass(frozen=True)
class _Term:
    """One layer's share of the cost: ``coef * out_kept * in_kept``, each side fixed or set by a group."""

    layer: str
    coef: Fraction
    out_fixed: int
    out_group: int | None  # index of the group whose kept count is this layer's output channels
    in_fixed: int  # input channels (per conv group) not owned by any prunable group
    in_groups: tuple[tuple[int, Fraction], ...]  # (group index, inputs per kept root channel)


class CostModel:
    """The model's cost as a function of the channels each group keeps.

    ``filters``: ``sum_g w_g k_g`` over the prunable groups. ``ops`` / ``params``:
    the sum over every conv and linear layer of the report's ``binary_ops`` /
    ``params`` (:func:`bnnslim.report.layer_costs`, at full width), scaled by the
    fraction of its output and input channels kept. Depthwise consumers shrink
    with their input, so their cost is linear in it.
    """

    def __init__(self, groups: Sequence[PrunableGroup], measure: str = "filters",
                 model: nn.Module | None = None, example: torch.Tensor | None = None) -> None:
        if measure not in MEASURES:
            raise BnnslimError(f"unknown budget measure '{measure}'", f"choose one of: {', '.join(MEASURES)}")
        self.measure = measure
        self.sizes = [g.size for g in groups]
        self.weights = [g.filters_per_channel for g in groups]
        self.terms: list[_Term] = []
        self.fixed = 0
        if measure == "filters":
            self.total: float = sum(g.filters for g in groups)
            return
        if model is None or example is None:
            raise BnnslimError(f"a budget in {measure} needs the model and an example input", "pass both")
        from bnnslim.report import layer_costs

        key = "binary_ops" if measure == "ops" else "params"
        modules = dict(model.named_modules())
        producer_of = {p: i for i, g in enumerate(groups) for p in g.producers}
        consumed: dict[str, list[tuple[int, int]]] = {}
        for i, g in enumerate(groups):
            for c in g.consumers:
                consumed.setdefault(c.name, []).append((i, len(c.positions)))
        for name, cost in layer_costs(model, example).items():
            full = int(getattr(cost, key))
            if full == 0:
                continue
            m = modules[name]
            if isinstance(m, nn.Conv2d):
                n_in, n_out, per_group_in = m.in_channels, m.out_channels, m.in_channels // m.groups
            else:
                n_in, n_out, per_group_in = m.in_features, m.out_features, m.in_features
            depthwise = isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
            ins = consumed.get(name, [])
            owned = sum(n for _, n in ins)
            in_groups = tuple((i, Fraction(n, self.sizes[i])) for i, n in ins)
            if depthwise:  # weight [out, 1, kh, kw]; out channels follow the inputs
                self.terms.append(_Term(name, Fraction(full, n_in), 1, None, n_in - owned, in_groups))
                continue
            if isinstance(m, nn.Conv2d) and m.groups > 1:  # grouped convs are never in a prunable group
                self.fixed += full
                continue
            out_group = producer_of.get(name)
            self.terms.append(_Term(name, Fraction(full, n_out * per_group_in), n_out if out_group is None else 0,
                                    out_group, per_group_in - owned, in_groups))
        self.total = self.cost(self.sizes)

    def cost(self, counts: Sequence[float]) -> float:
        """The cost with ``counts[g]`` channels kept in group ``g`` (exact for integer counts)."""
        if self.measure == "filters":
            return sum(w * k for w, k in zip(self.weights, counts, strict=True))
        total: float | Fraction = Fraction(self.fixed)
        for t in self.terms:
            out = t.out_fixed if t.out_group is None else counts[t.out_group]
            inp = t.in_fixed + sum(per * counts[i] for i, per in t.in_groups)
            total += t.coef * out * inp
        return int(total) if isinstance(total, Fraction) and total.denominator == 1 else float(total)


@dataclass
class Budget:
    """Tracks what is left to give while groups are decided in order (module docstring)."""

    groups: list[PrunableGroup]
    keep: float
    min_keep: float = 0.1
    round_to: int = 1
    max_shift: float | None = None
    measure: str = "filters"
    model: nn.Module | None = None
    example: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise BnnslimError(f"--keep {self.keep} is outside (0, 1]",
                               "give the fraction of filters to keep, e.g. 0.8")
        if self.round_to < 1:
            raise BnnslimError(f"--round-to {self.round_to} must be at least 1", "use 1 for no rounding")
        if self.max_shift is not None and self.max_shift < 0:
            raise BnnslimError(f"--max-shift {self.max_shift} is negative", "give a fraction >= 0, e.g. 0.25")
        self.costs = CostModel(self.groups, self.measure, self.model, self.example)
        self.sizes = [g.size for g in self.groups]
        self.weights = [g.filters_per_channel for g in self.groups]
        self.floors = [allowed_counts(g.size, self.min_keep, self.round_to) for g in self.groups]
        self.total = self.costs.total
        self.requested = round(self.keep * self.total)
        minimum = self.costs.cost([a[0] for a in self.floors])
        if self.requested < minimum:
            what = {"filters": "filters", "ops": "binary operations"}.get(self.measure, "parameters")
            at_least = math.ceil(1000 * minimum / self.total) / 1000
            unrounded = self.costs.cost([allowed_counts(g.size, self.min_keep, 1)[0] for g in self.groups])
            if self.round_to > 1 and self.requested >= unrounded:  # the rounding, not --min-keep, is in the way
                stuck = [g.size for g, a in zip(self.groups, self.floors, strict=True) if a == [g.size]]
                raise BnnslimError(
                    f"--keep {self.keep} asks for {self.requested} of {self.total} {what}, but with --round-to "
                    f"{self.round_to} every layer keeps at least {minimum} in all"
                    + (f" ({len(stuck)} layers are smaller than {self.round_to} filters and must stay whole)"
                       if stuck else ""),
                    f"lower --round-to (e.g. to {max(1, min(self.sizes) // 2)}) or raise --keep to at least {at_least}")
            raise BnnslimError(
                f"--keep {self.keep} asks for {self.requested} of {self.total} {what}, but every layer must keep at "
                f"least {self.min_keep:.0%} of its filters ({minimum} in all)",
                f"raise --keep to at least {at_least} or lower --min-keep")
        self.fraction = self._uniform_fraction(self.requested, [])
        self.allowed = [self._band(i) for i in range(len(self.groups))]
        if self.measure == "filters":
            full = _reachable(list(zip(self.weights, self.floors, strict=True)))
            self.target: float = self._nearest_reachable(full[0], self.requested)
            self._reach = _reachable(list(zip(self.weights, self.allowed, strict=True)))
            if not self._reach[0] >> int(self.target) & 1:
                # the bands cannot make the total (rounding, residual groups): every group gets its full range back
                self.allowed, self._reach = list(self.floors), full
        else:
            self.target = self.requested
        self.decided: list[int] = []

    # -- the uniform share and the bands around it ---------------------------------
    def _uniform_fraction(self, target: float, decided: Sequence[int]) -> float:
        """The fraction ``f`` that every undecided group keeps for the cost to meet ``target``."""
        def cost(f: float) -> float:
            return self.costs.cost([*decided, *(f * n for n in self.sizes[len(decided):])])

        lo, hi = 0.0, 1.0
        if cost(hi) <= target:
            return 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
        return lo

    def uniform_share(self, i: int) -> float:
        """Group ``i``'s uniform share: its channels times the budget's common fraction."""
        return self.fraction * self.sizes[i]

    def _band(self, i: int) -> list[int]:
        counts = self.floors[i]
        if self.max_shift is None:
            return counts
        share = self.uniform_share(i)
        low, high = share * (1 - self.max_shift), share * (1 + self.max_shift)
        band = [k for k in counts if low - 1e-9 <= k <= high + 1e-9]
        if not band:  # rounding left nothing inside: the allowed count nearest the share
            band = [min(counts, key=lambda k: (abs(k - share), k))]
        return band

    @staticmethod
    def _nearest_reachable(bits: int, t: int) -> int:
        for d in range(max(t, bits.bit_length()) + 1):
            for cand in (t - d, t + d):
                if cand >= 0 and (bits >> cand) & 1:
                    return cand
        raise BnnslimError("no channel counts satisfy the budget", "lower --round-to or --min-keep")

    # -- deciding group by group ----------------------------------------------------------
    @property
    def remaining(self) -> float:
        """The budget not yet spent by decided groups (undecided groups counted at zero)."""
        return self.target - self.costs.cost([*self.decided, *([0] * (len(self.groups) - len(self.decided)))])

    def suggestion(self) -> int:
        """A uniform share for the next group given the decisions so far, inside its band."""
        i = len(self.decided)
        f = self._uniform_fraction(self.target, self.decided)
        share = f * self.sizes[i]
        return min(self.feasible() or self.allowed[i], key=lambda k: (abs(k - share), k))

    def feasible(self) -> list[int]:
        """The counts the next group may keep so that the groups after it can still meet the budget."""
        i = len(self.decided)
        if self.measure == "filters":
            w, left = self.weights[i], self.remaining
            return [k for k in self.allowed[i]
                    if left - w * k >= 0 and (self._reach[i + 1] >> int(left - w * k)) & 1]
        rest = range(i + 1, len(self.groups))
        ok = []
        for k in self.allowed[i]:
            low = self.costs.cost([*self.decided, k, *(self.allowed[j][0] for j in rest)])
            if low > self.target:
                continue
            if i + 1 < len(self.groups):
                high = self.costs.cost([*self.decided, k, *(self.allowed[j][-1] for j in rest)])
                ok.append((k, high >= self.target))
            else:
                ok.append((k, True))
        if not ok:  # cannot happen after a feasible start: the lowest counts are always tried
            return [self.allowed[i][0]]
        if i + 1 == len(self.groups):  # the last group spends what is left
            return [max(k for k, _ in ok)]
        meeting = [k for k, reaches in ok if reaches]
        return meeting or [max(k for k, _ in ok)]

    def choose(self, proposed: int) -> int:
        """Decide the next group's count: the feasible count nearest ``proposed``."""
        feasible = self.feasible()
        if not feasible:  # cannot happen: the target was chosen reachable
            raise BnnslimError("the budget became unreachable", "report this as a bug")
        k = min(feasible, key=lambda c: (abs(c - proposed), -c))
        self.decided.append(k)
        return k

    def replay(self, counts: list[int]) -> None:
        """Re-apply decisions from an interrupted run."""
        self.decided.extend(counts)

    @property
    def kept(self) -> int:
        """Filters kept by the decided groups (whatever the measure)."""
        return sum(w * k for w, k in zip(self.weights, self.decided, strict=False))  # decided: the groups so far

    @property
    def spent(self) -> float:
        """The budget's measure for the decided groups (undecided ones at full size)."""
        return self.costs.cost([*self.decided, *self.sizes[len(self.decided):]])
