"""Built-in selection strategies: the learned subsidiary selectors and rule-based baselines."""

from __future__ import annotations

from collections.abc import Iterator

from bnnslim.hookspecs import hookimpl
from bnnslim.plugin_types import StrategySpec


@hookimpl
def bnnslim_strategies() -> Iterator[StrategySpec]:
    from bnnslim.prune import rules, subsidiary

    yield StrategySpec("subsidiary", "learned per-filter selectors, layer-wise bottom-up (Xu et al., CVPR 2019)",
                       subsidiary.select_subsidiary)
    yield StrategySpec("l1", "L1 norm of the latent weights (Li et al. 2017)", rules.select_l1)
    yield StrategySpec("alpha", "XNOR scale alpha = mean|W| per filter", rules.select_alpha)
    yield StrategySpec("bn", "BatchNorm |gamma| (network slimming, Liu et al. 2017)", rules.select_bn)
    yield StrategySpec("random", "random filters (seeded)", rules.select_random)
    yield StrategySpec("greedy", "remove the filters whose removal raises a held-out loss least", rules.select_greedy)
