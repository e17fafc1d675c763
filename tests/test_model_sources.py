"""Model sources (``PREFIX:NAME``): the built-in ``torchvision`` source, a plugin's model zoo, and run
directories that rebuild a plugin's model later."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _helpers import assert_clean_error
from torch import nn
from typer.testing import Result

from bnnslim import plugins
from bnnslim.errors import BnnslimError
from bnnslim.hookspecs import hookimpl
from bnnslim.model_source import load_model_source, plugin_model_identity
from bnnslim.plugin_types import ModelSourceSpec
from bnnslim.run_model import load_run_model
from bnnslim.rundir import RunDir

ZOO = {"tiny": 4, "small": 8}


def build_zoo_model(name: str, num_classes: int | None, in_channels: int | None) -> nn.Module:
    if name == "broken":
        raise ValueError("weights server unreachable")
    if name == "not-a-model":
        return 42  # type: ignore[return-value]
    w = ZOO[name]
    return nn.Sequential(
        nn.Conv2d(in_channels or 3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.Hardtanh(),
        nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.Hardtanh(),
        nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.Hardtanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, num_classes or 10))


class ZooPlugin:
    @hookimpl
    def bnnslim_model_sources(self):  # type: ignore[no-untyped-def]
        yield ModelSourceSpec(name="myzoo", description="tiny test CNNs", build=build_zoo_model,
                              list_models=lambda: [*ZOO, "broken", "not-a-model"],
                              input_shape=lambda name: (3, 16, 16), version="zoo-1")


@pytest.fixture
def zoo(monkeypatch: pytest.MonkeyPatch) -> Iterator[ZooPlugin]:
    """The zoo plugin, registered as if installed from the distribution bnnslim-myzoo 1.0."""
    pm = plugins.get_plugin_manager()
    plugin = ZooPlugin()
    pm.register(plugin, name="myzoo-plugin")
    monkeypatch.setitem(plugins._INFO, "myzoo-plugin", plugins.PluginInfo("myzoo-plugin", "bnnslim-myzoo", "1.0"))
    yield plugin
    if pm.is_registered(plugin):
        pm.unregister(plugin)
    plugins.reset_plugin_manager()


# -- the built-in torchvision source ----------------------------------------------------------------------------


def test_torchvision_model_is_built_for_the_dataset() -> None:
    source = load_model_source("torchvision:resnet18")
    assert (source.path, source.name, source.spec) == (Path("torchvision"), "resnet18", "torchvision:resnet18")
    assert source.input_shape == (3, 224, 224) and source.provider == "bnnslim (built-in)"
    assert len(source.sha256) == 64 and source.sha256 == load_model_source("TorchVision:resnet18").sha256
    model = source.build(num_classes=4, in_channels=1)
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 64  # the first conv reads 1 channel
    assert model.fc.out_features == 4


def test_unknown_torchvision_model_suggests_close_names() -> None:
    with pytest.raises(BnnslimError, match="model source 'torchvision' has no model 'resnet19'. did you mean resnet18"):
        load_model_source("torchvision:resnet19")


def test_unknown_prefix_suggests_the_model_source(tmp_path: Path) -> None:
    with pytest.raises(BnnslimError) as err:
        load_model_source("torchvison:resnet18")
    assert "'torchvison' is not a model source. did you mean torchvision:resnet18?" in str(err.value)


def test_file_paths_keep_working(toy_model_file: Path) -> None:
    source = load_model_source(str(toy_model_file))
    assert source.provider == "" and source.spec == f"{toy_model_file}:build_model"
    with pytest.raises(BnnslimError, match="model file '.*nope.py' not found"):
        load_model_source(str(toy_model_file.parent / "nope.py:build"))


def test_an_existing_file_wins_over_a_model_source(toy_model_file: Path, zoo: ZooPlugin,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (toy_model_file.parent / "myzoo").write_text("not python\n")
    monkeypatch.chdir(toy_model_file.parent)
    with pytest.raises(BnnslimError, match=r"'.*/myzoo' is not a Python source file \(\.py\)"):
        load_model_source("myzoo:tiny")  # the file named myzoo, not the zoo


def test_binarize_torchvision_resnet18_from_the_command_line(cli: Callable[..., Result], tmp_path: Path) -> None:
    result = cli("binarize", "torchvision:resnet18", "--input-shape", "3,32,32", "--run", "run")
    assert result.exit_code == 0, result.output
    manifest = RunDir(tmp_path / "run").read_manifest()
    assert (manifest["model"]["source"], manifest["model"]["name"]) == ("torchvision", "resnet18")
    info = cli("info", "--run", "run")  # rebuilt from the source the manifest records
    assert info.exit_code == 0, info.output
    assert "torchvision:resnet18" in info.stdout and "layer4.1.conv2" in info.stdout


# -- a plugin's model zoo ---------------------------------------------------------------------------------------


def test_plugin_model_source_records_its_identity(zoo: ZooPlugin) -> None:
    source = load_model_source("myzoo:small")
    provided = plugins.find_model_source("myzoo")
    assert provided is not None
    assert source.sha256 == plugin_model_identity(provided, "small") != plugin_model_identity(provided, "tiny")
    assert source.input_shape == (3, 16, 16) and source.where == "myzoo:small (from plugin 'myzoo-plugin' " \
                                                                 "(bnnslim-myzoo 1.0))"
    assert isinstance(source.build(num_classes=3, in_channels=1), nn.Sequential)


@pytest.mark.parametrize("name, words", [
    ("broken", "building 'myzoo:broken' failed in plugin 'myzoo-plugin' (bnnslim-myzoo 1.0): "
               "ValueError: weights server unreachable"),
    ("not-a-model", "not-a-model in myzoo:not-a-model (from plugin 'myzoo-plugin' (bnnslim-myzoo 1.0)) "
                    "returned int, not an nn.Module"),
])
def test_plugin_model_that_fails_to_build_names_the_plugin(zoo: ZooPlugin, name: str, words: str) -> None:
    with pytest.raises(BnnslimError) as err:
        load_model_source(f"myzoo:{name}").build(num_classes=2)
    assert words in str(err.value)


def test_run_of_a_plugin_model_is_rebuilt_and_checked(zoo: ZooPlugin, cli: Callable[..., Result], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    result = cli("binarize", "myzoo:small", "--run", "run")
    assert result.exit_code == 0, result.output
    run = RunDir(tmp_path / "run")
    model = run.read_manifest()["model"]
    assert (model["source"], model["name"]) == ("myzoo", "small")
    assert load_run_model(run).source.sha256 == model["sha256"]
    assert cli("info", "--run", "run").exit_code == 0

    # the plugin is upgraded: the run no longer matches what it builds
    monkeypatch.setitem(plugins._INFO, "myzoo-plugin", plugins.PluginInfo("myzoo-plugin", "bnnslim-myzoo", "2.0"))
    assert_clean_error(cli("info", "--run", "run"), "model 'myzoo:small' is now provided by plugin 'myzoo-plugin' "
                       "(bnnslim-myzoo 2.0)", "install the plugin version the run was made with")

    # the plugin is uninstalled
    plugins.get_plugin_manager().unregister(zoo)
    assert_clean_error(cli("info", "--run", "run"), "comes from a model source 'myzoo' that no installed plugin "
                       "provides")


def test_convert_only_uses_the_sources_input_shape(zoo: ZooPlugin, cli: Callable[..., Result],
                                                  tmp_path: Path) -> None:
    assert cli("binarize", "myzoo:tiny", "--run", "run").exit_code == 0
    assert RunDir(tmp_path / "run").read_manifest()["input_shape"] == [3, 16, 16]
