"""Plugin-side failures inside commands: the plugin is named, not the user's model; a closed pipe is no error."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _helpers import SMALL_CNN
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from bnnslim import plugins
from bnnslim.cli.app import app
from bnnslim.hookspecs import hookimpl
from bnnslim.plugin_types import DatasetSpec, DatasetSplits, SchemeSpec


@pytest.fixture
def register() -> Iterator:
    pm = plugins.get_plugin_manager()
    added: list[object] = []

    def reg(plugin: object, name: str) -> None:
        pm.register(plugin, name=name)
        added.append(plugin)

    yield reg
    for plugin in added:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
    plugins.reset_plugin_manager()


def dataset_plugin(build) -> object:  # type: ignore[no-untyped-def]
    class P:
        @hookimpl
        def bnnslim_datasets(self):  # type: ignore[no-untyped-def]
            yield DatasetSpec("wobbly", "a test dataset", (1, 28, 28), 10, build=build)
    return P()


def _raises(_root: object) -> DatasetSplits:
    raise ConnectionError("server gone")


def _tiny(_root: object) -> DatasetSplits:
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    return DatasetSplits(TensorDataset(x, y), TensorDataset(x, y))


def clean_error(result, *words: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in result.output, result.output


@pytest.mark.parametrize("build, words", [
    (_raises, "dataset 'wobbly' from plugin 'wobbly-plugin' failed to build: ConnectionError: server gone"),
    (lambda root: [1, 2], "returned list from build, not DatasetSplits"),
    (lambda root: DatasetSplits(train=3, test=4), "returned DatasetSplits from build, not DatasetSplits(train, test) "
                                                  "of two map-style datasets"),
])
def test_dataset_plugin_that_fails_is_named(register, tmp_path: Path, monkeypatch, build, words: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    register(dataset_plugin(build), "wobbly-plugin")
    clean_error(CliRunner().invoke(app, ["binarize", f"{SMALL_CNN}:tiny", "--data", "wobbly", "--epochs", "1"]),
                words)
    assert not (tmp_path / "bnnslim-run").exists()


def test_scheme_plugin_that_raises_is_blamed_not_the_model(register, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def broken_weight(w: torch.Tensor) -> torch.Tensor:
        raise ZeroDivisionError("scale of nothing")

    class P:
        @hookimpl
        def bnnslim_schemes(self):  # type: ignore[no-untyped-def]
            yield SchemeSpec("shaky", "a test scheme", torch.sign, broken_weight, lambda w, kept: None)

    monkeypatch.chdir(tmp_path)
    register(P(), "shaky-plugin")
    result = CliRunner().invoke(app, ["binarize", f"{SMALL_CNN}:tiny", "--scheme", "shaky"])
    clean_error(result, "scheme 'shaky' from plugin 'shaky-plugin' failed in binarize_weight: ZeroDivisionError")
    assert "rejects inputs" not in result.output


def test_dataset_plugin_that_works_is_not_disturbed(register, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    register(dataset_plugin(_tiny), "tiny-plugin")
    result = CliRunner().invoke(app, ["binarize", f"{SMALL_CNN}:tiny", "--data", "wobbly", "--epochs", "1",
                                      "--batch-size", "4"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args", [["plugins", "--json"], ["info", "--datasets"]])  # plain text, and Rich
def test_closed_output_pipe_is_not_an_error(tmp_path: Path, args: list[str]) -> None:
    """`bnnslim plugins --json | head`: the reader has left; no traceback and no false error."""
    proc = subprocess.Popen([sys.executable, "-m", "bnnslim", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader leaves before the first byte
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141  # 128 + SIGPIPE, as a shell pipeline reports it
    assert "Traceback" not in err and "error" not in err.lower() and "Exception ignored" not in err, err


def test_state_is_loaded_with_the_models_own_version_metadata() -> None:
    """torchvision's MNASNet refuses a state dict without its version; safetensors keeps none."""
    torchvision = pytest.importorskip("torchvision")
    from bnnslim.rundir import load_with_metadata

    source = torchvision.models.mnasnet0_5(num_classes=3)
    tensors = {k: v.clone() for k, v in source.state_dict().items()}  # as safetensors gives them back
    target = torchvision.models.mnasnet0_5(num_classes=3)
    with pytest.raises(ValueError, match="version"):
        target.load_state_dict(tensors)
    load_with_metadata(target, tensors)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), tensors.values(), strict=True))


def test_plugin_command_whose_pipe_closes_is_not_blamed(register, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`bnnslim PLUGIN-COMMAND | head`: a closed pipe is not the plugin's failure."""
    from bnnslim.cli.app import app as bnnslim_app
    from bnnslim.cli.plugins import add_plugin_commands
    from bnnslim.plugin_types import CommandSpec

    def talk() -> None:
        raise BrokenPipeError(32, "Broken pipe")  # what print() raises once the reader has gone

    class P:
        @hookimpl
        def bnnslim_commands(self):  # type: ignore[no-untyped-def]
            yield CommandSpec("talk", "prints a lot", talk)

    register(P(), "talker")
    monkeypatch.setattr(bnnslim_app, "registered_commands", list(bnnslim_app.registered_commands))
    monkeypatch.setattr("os.dup2", lambda *a: None)  # keep the test runner's own stdout
    add_plugin_commands(bnnslim_app, ["talk"])
    result = CliRunner().invoke(bnnslim_app, ["talk"])
    assert result.exit_code == 141, result.output
    assert "error" not in result.output and "talker" not in result.output
