"""bnnslim-fpgm: the FPGM filter selection rule as a ``bnnslim prune --strategy``.

FPGM (Filter Pruning via Geometric Median; He, Liu, Wang, Hu, Yang, CVPR 2019):
the filters of a layer that lie closest to the geometric median of all its
filters carry information the others already carry, so they are the ones to
remove, whatever their norm. The geometric median is approximated as in the
paper's code: filter ``i`` scores ``sum_j ||F_i - F_j||_2`` and the filters with
the smallest sums are pruned.

This module is imported whenever ``bnnslim`` starts: it stays light and imports
torch only inside the hook (see :mod:`bnnslim_fpgm.rule`).
"""

from __future__ import annotations

from collections.abc import Iterator

from bnnslim.hookspecs import hookimpl
from bnnslim.plugin_types import StrategySpec

__version__ = "0.1.0"


@hookimpl
def bnnslim_strategies() -> Iterator[StrategySpec]:
    from bnnslim_fpgm.rule import select_fpgm, select_fpgm_binary

    yield StrategySpec(
        "fpgm",
        "FPGM (He et al., CVPR 2019): remove the filters nearest the geometric median of their group "
        "(L2 distance between latent weights)",
        select_fpgm,
    )
    yield StrategySpec(
        "fpgm-binary",
        "FPGM on the binary filters the layer computes with (alpha * sign(W)): removes near-duplicate "
        "sign patterns",
        select_fpgm_binary,
    )
