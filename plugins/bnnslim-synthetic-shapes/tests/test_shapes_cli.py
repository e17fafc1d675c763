"""bnnslim-synthetic-shapes used the way a user uses it: installed, through its entry point, from the
command line (``--data shapes`` and ``bnnslim shapes-export``)."""

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

MODEL = """
    from torch import nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.Hardtanh())

    def build_model(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
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


def bnnslim(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``bnnslim`` script (plugin commands are added when it starts)."""
    script = Path(sys.executable).with_name("bnnslim")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "bnnslim"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


def test_bnnslim_plugins_lists_the_datasets_and_the_command() -> None:
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    shapes = next(p for p in json.loads(result.stdout)["plugins"] if p["name"] == "synthetic-shapes")
    assert shapes["distribution"] == "bnnslim-synthetic-shapes"
    assert shapes["provides"] == {"bnnslim_datasets": ["shapes", "shapes-gray"], "bnnslim_commands": ["shapes-export"]}


@pytest.mark.parametrize("data, shape", [("shapes", [3, 32, 32]), ("shapes-gray", [1, 28, 28])])
def test_binarize_and_train_on_shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: str,
                                      shape: list[int]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(textwrap.dedent(MODEL))
    result = CliRunner().invoke(app, ["binarize", "net.py", "--run", "run", "--data", data, "--epochs", "1",
                                      "--steps-per-epoch", "3", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    manifest = RunDir(tmp_path / "run").read_manifest()
    assert manifest["dataset"]["name"] == data and manifest["input_shape"] == shape
    assert manifest["binarize"]["trained"]


def test_shapes_export_writes_the_folder_layout(tmp_path: Path) -> None:
    help_text = bnnslim("--help").stdout
    assert "shapes-export" in help_text
    proc = bnnslim("shapes-export", str(tmp_path / "out"), "--dataset", "shapes-gray", "--per-class", "2")
    assert proc.returncode == 0, proc.stderr
    for split in ("train", "val"):
        folders = sorted(p.name for p in (tmp_path / "out" / split).iterdir())
        assert len(folders) == 10 and "circle" in folders
        assert all(len(list((tmp_path / "out" / split / f).glob("*.png"))) == 2 for f in folders)

    import numpy as np
    from bnnslim_synthetic_shapes.dataset import build
    from PIL import Image

    ds = build("shapes-gray").train
    first_circle = int((ds.labels == ds.classes.index("circle")).nonzero()[0])
    png = Image.open(tmp_path / "out" / "train" / "circle" / "00000.png")
    assert np.array_equal(np.asarray(png), ds.images[first_circle][0].numpy())  # lossless


def test_shapes_export_rejects_an_unknown_dataset(tmp_path: Path) -> None:
    proc = bnnslim("shapes-export", str(tmp_path / "out"), "--dataset", "triangles")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: unknown shapes dataset 'triangles'. choose one of: shapes, shapes-gray"


def test_importing_the_plugin_does_not_import_torch() -> None:
    code = ("import sys, bnnslim_synthetic_shapes; "
            "print('torch' in sys.modules, 'bnnslim_synthetic_shapes.generate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
