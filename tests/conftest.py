"""Shared fixtures: the CLI runner, model files in tmp_path, schemes, tiny datasets."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _helpers import BUNDLED, TINY_MODEL, TOY_MODEL
from typer.testing import CliRunner, Result

from bnnslim import plugins
from bnnslim.plugin_types import DatasetSplits
from bnnslim.stages.binarize import BinarizeOptions, binarize
from bnnslim.train import TrainConfig

# One thread: the tests' tensors are tiny, and on a shared machine a second thread
# only waits for a core (one training test went from 1 s to 20 s with two).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_isolate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from the same RNG state, sees bnnslim's built-in plugins only, stays offline."""
    torch.manual_seed(0)
    monkeypatch.setenv("BNNSLIM_DISABLE_EXTERNAL_PLUGINS", "1")
    monkeypatch.setenv("BNNSLIM_OFFLINE", "1")  # a test never downloads a dataset


@pytest.fixture(scope="session")
def bundled_splits() -> DatasetSplits:
    """The bundled Fashion-MNIST subset (6000 train / 1000 test), built once."""
    from bnnslim.plugins import get_dataset

    return get_dataset(BUNDLED).build(None)


@pytest.fixture
def write_model(tmp_path: Path) -> Callable[..., Path]:
    """Write a model file into tmp_path: ``write_model(source, name="net.py")`` -> its path."""

    def write(source: str, name: str = "net.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
        return path

    return write


@pytest.fixture
def toy_model_file(write_model: Callable[..., Path]) -> Path:
    return write_model(TOY_MODEL, "toy.py")


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """Run ``bnnslim ARGS...`` in-process with tmp_path as the working directory.

    ``result.stdout`` and ``result.stderr`` are separate; ``result.output`` holds both.
    """
    from bnnslim.cli._common import console, err_console
    from bnnslim.cli.app import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(console, "width", 200)  # tables keep whole layer names on one line
    monkeypatch.setattr(err_console, "width", 200)
    runner = CliRunner()

    def invoke(*args: object) -> Result:
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A binarized, briefly trained run of a 3-block CNN (two prunable groups), built-in plugins only."""
    base = tmp_path_factory.mktemp("tiny")
    (base / "tiny.py").write_text(textwrap.dedent(TINY_MODEL))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(plugins.DISABLE_EXTERNAL_ENV, "1")
        plugins.reset_plugin_manager()
        binarize(BinarizeOptions(model=str(base / "tiny.py"), run=base / "run", data="fashion-mnist-mini",
                                 train=TrainConfig(epochs=1, steps_per_epoch=3, batch_size=32)))
    plugins.reset_plugin_manager()
    return base / "run"
