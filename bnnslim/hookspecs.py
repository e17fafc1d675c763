"""Hook specifications: what a bnnslim plugin can provide.

A plugin is a module (or object) with functions named like the hooks below and
marked with :data:`hookimpl`. Third-party plugins register through the Python
entry-point group ``bnnslim`` (``docs/plugins.md`` is the author's guide).

Every hook takes no arguments and returns (or yields) objects of one type from
:mod:`bnnslim.plugin_types`. The plugin module is imported whenever ``bnnslim``
starts, even for ``--help``: keep its top level light and import torch and other
heavy modules inside the hook bodies and the callables they return. Each
docstring's example is runnable (a test runs them).
"""

from __future__ import annotations

from collections.abc import Iterable

import pluggy

from bnnslim.plugin_types import (
    CommandSpec,
    DatasetSpec,
    ModelSourceSpec,
    PrunerSpec,
    SchemeSpec,
    StrategySpec,
)

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

    @hookspec
    def bnnslim_model_sources(self) -> Iterable[ModelSourceSpec]:
        """Model zoos for ``bnnslim binarize PREFIX:NAME`` (built in: ``torchvision:resnet18``).

        A spec ``PREFIX:NAME`` that is not an existing file and whose prefix is a
        registered source is built by that source. A run directory records the
        source, the name and a hash of the plugin's distribution and version, so
        later commands rebuild the same model.

        Example::

            from bnnslim.hookspecs import hookimpl
            from bnnslim.plugin_types import ModelSourceSpec

            ZOO = {"tiny": 8, "small": 16}  # name -> width

            def build(name, num_classes, in_channels):
                from torch import nn
                from bnnslim.errors import BnnslimError
                if name not in ZOO:
                    raise BnnslimError(f"no model '{name}' in myzoo", f"choose one of: {', '.join(ZOO)}")
                w = ZOO[name]
                return nn.Sequential(
                    nn.Conv2d(in_channels or 3, w, 3, padding=1), nn.BatchNorm2d(w), nn.Hardtanh(),
                    nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.Hardtanh(),
                    nn.Conv2d(w, w, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                    nn.Linear(w, num_classes or 10))

            @hookimpl
            def bnnslim_model_sources():
                yield ModelSourceSpec(name="myzoo", description="two tiny CNNs", build=build,
                                      list_models=lambda: sorted(ZOO), input_shape=(3, 32, 32), version="1")
        """
        raise NotImplementedError

    @hookspec
    def bnnslim_pruners(self) -> Iterable[PrunerSpec]:
        """Pruners for layer types torch-pruning does not know, so they can be pruned and slimmed.

        Without one, a layer that owns parameters outside standard layers makes
        bnnslim stop with an error naming the layer. The pruner is used whenever
        bnnslim traces a model (binarize, prune, slimming).

        Example::

            import torch
            import torch_pruning as tp
            from torch import nn
            from bnnslim.hookspecs import hookimpl
            from bnnslim.plugin_types import PrunerSpec

            class ChannelScale(nn.Module):  # y = x * scale[c]: one learned factor per channel
                def __init__(self, channels):
                    super().__init__()
                    self.scale = nn.Parameter(torch.ones(channels))
                def forward(self, x):
                    return x * self.scale.view(1, -1, 1, 1)

            class ChannelScalePruner(tp.pruner.BasePruningFunc):
                def prune_out_channels(self, layer, idxs):
                    keep = [i for i in range(layer.scale.numel()) if i not in set(idxs)]
                    layer.scale = nn.Parameter(layer.scale.data[keep])
                    return layer
                prune_in_channels = prune_out_channels  # per channel: an input channel is an output channel
                def get_out_channels(self, layer):
                    return layer.scale.numel()
                get_in_channels = get_out_channels

            @hookimpl
            def bnnslim_pruners():
                yield PrunerSpec(layer_type=ChannelScale, pruner=ChannelScalePruner())
        """
        raise NotImplementedError

    @hookspec
    def bnnslim_commands(self) -> Iterable[CommandSpec]:
        """Extra ``bnnslim NAME`` commands, added to the command line when it starts.

        ``callback`` is an ordinary Typer command function; errors it raises as
        :class:`bnnslim.errors.BnnslimError` are printed as one line, anything
        else as an error naming the plugin.

        Example::

            import typer
            from bnnslim.hookspecs import hookimpl
            from bnnslim.plugin_types import CommandSpec

            def hello(name: str = typer.Option("world", help="Who to greet.")) -> None:
                typer.echo(f"hello {name}")

            @hookimpl
            def bnnslim_commands():
                yield CommandSpec(name="hello", help="Say hello.", callback=hello)
        """
        raise NotImplementedError
