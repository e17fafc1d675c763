"""Hook specifications: what a bnnslim plugin can provide.

A plugin is a module (or object) with functions named like the hooks below and
marked with :data:`hookimpl`. Third-party plugins register through the Python
entry-point group ``bnnslim``.
"""

from __future__ import annotations

from collections.abc import Iterable

import pluggy

from bnnslim.plugin_types import DatasetSpec, SchemeSpec, StrategySpec

PROJECT = "bnnslim"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class BnnslimSpecs:
    """All hooks of bnnslim. Every hook returns an iterable of typed specs."""

    @hookspec
    def bnnslim_datasets(self) -> Iterable[DatasetSpec]:
        """Datasets selectable with ``--data NAME``.

        Example::

            from bnnslim.hookspecs import hookimpl
            from bnnslim.plugin_types import DatasetSpec, DatasetSplits

            @hookimpl
            def bnnslim_datasets():
                def build(root):
                    import torch
                    from torch.utils.data import TensorDataset
                    x = torch.randn(64, 1, 28, 28)
                    y = torch.randint(0, 10, (64,))
                    return DatasetSplits(train=TensorDataset(x, y), test=TensorDataset(x, y))
                yield DatasetSpec(name="noise", description="random images", input_shape=(1, 28, 28),
                                  num_classes=10, build=build)
        """
        raise NotImplementedError

    @hookspec
    def bnnslim_schemes(self) -> Iterable[SchemeSpec]:
        """Binarization schemes selectable with ``--scheme NAME``.

        Example::

            from bnnslim.hookspecs import hookimpl
            from bnnslim.plugin_types import SchemeSpec
            from bnnslim.binary.ste import ste_sign, mean_abs_scale

            @hookimpl
            def bnnslim_schemes():
                yield SchemeSpec(name="xnor-clone", description="XNOR-Net again",
                                 binarize_input=ste_sign, binarize_weight=ste_sign,
                                 scale=mean_abs_scale)
        """
        raise NotImplementedError

    @hookspec
    def bnnslim_strategies(self) -> Iterable[StrategySpec]:
        """Filter selection strategies selectable with ``bnnslim prune --strategy NAME``.

        Example::

            import torch
            from bnnslim.hookspecs import hookimpl
            from bnnslim.plugin_types import Selection, StrategySpec

            def last_first(ctx):
                # keep the filters with the highest index
                return Selection(scores=torch.arange(ctx.group.size, dtype=torch.float32))

            @hookimpl
            def bnnslim_strategies():
                yield StrategySpec(name="last-first", description="keeps late filters", select=last_first)
        """
        raise NotImplementedError
