"""bnnslim-fpgm used the way a user uses it: installed, through its entry point, from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnnslim import plugins
from bnnslim.cli.app import app
from bnnslim.rundir import RunDir
from bnnslim.stages.binarize import BinarizeOptions, binarize
from bnnslim.train import TrainConfig

MODEL = """
    from torch import nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.Hardtanh())

    def build_model(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
        return nn.Sequential(block(in_channels, 8), block(8, 8), nn.MaxPool2d(2), block(8, 8),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
"""

torch.set_num_threads(1)  # tiny tensors: a second thread only waits for a core on a shared machine


@pytest.fixture(autouse=True)
def entry_points_enabled(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(plugins.DISABLE_EXTERNAL_ENV, raising=False)
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()


@pytest.fixture
def run(tmp_path: Path) -> Path:
    (tmp_path / "net.py").write_text(textwrap.dedent(MODEL))
    binarize(BinarizeOptions(model=str(tmp_path / "net.py"), run=tmp_path / "run", data="fashion-mnist-mini",
                             train=TrainConfig(epochs=1, steps_per_epoch=3, batch_size=32)))
    return tmp_path / "run"


def test_bnnslim_plugins_lists_fpgm() -> None:
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    fpgm = next(p for p in json.loads(result.stdout)["plugins"] if p["name"] == "fpgm")
    assert (fpgm["distribution"], fpgm["version"]) == ("bnnslim-fpgm", "0.1.0")
    assert fpgm["provides"] == {"bnnslim_strategies": ["fpgm", "fpgm-binary"]}


@pytest.mark.parametrize("strategy", ["fpgm", "fpgm-binary"])
def test_prune_with_fpgm(run: Path, strategy: str) -> None:
    result = CliRunner().invoke(app, ["prune", "--run", str(run), "--keep", "0.5", "--strategy", strategy,
                                      "--select-steps", "2", "--retrain-steps", "2", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    pruned = RunDir(run).read_manifest()["prune"]
    assert pruned["strategy"] == strategy
    assert pruned["filters_kept"] == pruned["filters_total"] // 2
    assert all(layer["after"] >= 1 for layer in pruned["layers"].values())


def test_importing_the_plugin_does_not_import_torch() -> None:
    code = "import sys, bnnslim_fpgm; print('torch' in sys.modules, 'bnnslim_fpgm.rule' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
