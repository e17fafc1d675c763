"""A custom layer that torch-pruning does not know: an error naming it, then a pruner plugin that makes the
whole chain (binarize, prune, export, reload) work."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from _helpers import assert_clean_error
from typer.testing import Result

from bnnslim import plugins
from bnnslim.errors import BnnslimError
from bnnslim.graph import build_graph
from bnnslim.hookspecs import hookimpl
from bnnslim.model_source import file_sha256
from bnnslim.plugin_types import PrunerSpec

LAYER_MODULE = '''
import torch
import torch_pruning as tp
from torch import nn


class ChannelScale(nn.Module):
    """y = x * scale[c] + shift[c]: a learned affine map per channel, with parameters of its own."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.2, channels))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


class ChannelScalePruner(tp.pruner.BasePruningFunc):
    def prune_out_channels(self, layer, idxs):
        keep = [i for i in range(layer.scale.numel()) if i not in set(idxs)]
        layer.scale = nn.Parameter(layer.scale.data[keep])
        layer.shift = nn.Parameter(layer.shift.data[keep])
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return layer.scale.numel()

    get_in_channels = get_out_channels
'''
MODEL = '''
from torch import nn
from chanscale import ChannelScale

INPUT_SHAPE = (1, 28, 28)


def build_model(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh()),
        nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), ChannelScale(12), nn.Hardtanh()),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(12, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
'''


@pytest.fixture
def model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "chanscale.py").write_text(textwrap.dedent(LAYER_MODULE))
    (tmp_path / "net.py").write_text(textwrap.dedent(MODEL))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "net.py"
    # forget both modules: the next test's model must use the class its pruner plugin names
    sys.modules.pop("chanscale", None)
    sys.modules.pop(f"bnnslim_user_model_{file_sha256(tmp_path / 'net.py')}", None)


@pytest.fixture
def pruner_plugin(model_file: Path) -> Iterator[object]:
    """A plugin (registered for the test) that provides the ChannelScale pruner."""
    layer = importlib.import_module("chanscale")

    class ChannelScalePlugin:
        @hookimpl
        def bnnslim_pruners(self):  # type: ignore[no-untyped-def]
            yield PrunerSpec(layer_type=layer.ChannelScale, pruner=layer.ChannelScalePruner())

    plugin = ChannelScalePlugin()
    pm = plugins.get_plugin_manager()
    pm.register(plugin, name="chanscale-pruner")
    yield plugin
    pm.unregister(plugin)
    plugins.reset_plugin_manager()


def test_unknown_layer_with_parameters_is_an_error_naming_it_and_the_hook(
        model_file: Path, cli: Callable[..., Result], tmp_path: Path) -> None:
    result = cli("binarize", model_file, "--run", "run")
    assert_clean_error(result, "module '1.2' (ChannelScale) owns 1.2.scale, 1.2.shift",
                       "register a pruner for ChannelScale with the bnnslim_pruners plugin hook", "docs/plugins.md")
    assert not (tmp_path / "run").exists()


def test_unwrapped_parameter_of_the_model_itself_is_named() -> None:
    class Gain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.gain = torch.nn.Parameter(torch.ones(1, 4, 1, 1))
            self.temperature = torch.nn.Parameter(torch.ones(()))  # no channel dimension: not an error

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * self.gain * self.temperature

    with pytest.raises(BnnslimError, match=r"the model itself \(Gain\) owns gain\. register a pruner for Gain"):
        build_graph(Gain(), torch.randn(2, 1, 8, 8))


@pytest.fixture
def exported(pruner_plugin: object, model_file: Path, cli: Callable[..., Result], tmp_path: Path) -> Path:
    """binarize, prune and export the model with the custom layer, its pruner coming from a plugin."""
    quick = ("--batch-size", "32")
    binarized = cli("binarize", model_file, "--run", "run", "--data", "fashion-mnist-mini", "--epochs", "1",
                    "--steps-per-epoch", "3", *quick)
    assert binarized.exit_code == 0, binarized.output
    pruned = cli("prune", "--run", "run", "--keep", "0.5", "--strategy", "l1", "--select-steps", "1",
                 "--retrain-steps", "2", *quick)
    assert pruned.exit_code == 0, pruned.output
    result = cli("export", "--run", "run", "--format", "plain", "--output", "slim.safetensors", "--no-evaluate")
    assert result.exit_code == 0, result.output
    assert "slim == masked" in result.stdout  # the custom layer lost exactly the pruned channels
    return tmp_path / "slim.safetensors"


def test_a_pruner_plugin_makes_the_layer_prunable_and_exportable(exported: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(exported), framework="pt") as f:
        assert f.get_slice("1.2.scale").get_shape() == f.get_slice("1.2.shift").get_shape() == [6]
        assert f.get_slice("1.0.weight").get_shape()[0] == 6 and f.get_slice("3.0.weight").get_shape()[1] == 6


def test_an_exported_custom_layer_reloads(exported: Path) -> None:
    import bnnslim

    model = bnnslim.load(exported)
    scale = model.get_submodule("1.2")
    assert scale.scale.numel() == scale.shift.numel() == 6
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
