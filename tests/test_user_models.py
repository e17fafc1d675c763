"""What a user's own model meets: warnings at binarize and export, weight sharing in the report, datasets listed."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bnnslim.checks import dead_model_warnings
from bnnslim.cli.app import app
from bnnslim.report import layer_costs
from bnnslim.run_model import load_run_model
from bnnslim.rundir import RunDir, save_weights
from bnnslim.stages.binarize import BinarizeOptions, binarize
from bnnslim.stages.export import export

WARNED = """
from torch import nn
INPUT_SHAPE = (4, 8, 8)

class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1)
    def forward(self, x):
        return x * self.fc(self.pool(x)).sigmoid()

def build_model(num_classes=3, in_channels=4):
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(),      # after a ReLU: warned
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Hardtanh(),  # depthwise: warned
        SE(8),                                                              # SE 1x1 on a pooled map: warned
        nn.Conv2d(8, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
"""

CLEAN = WARNED.replace("nn.ReLU()", "nn.Hardtanh()").replace("groups=8", "groups=1").replace(
    "        SE(8),                                                              # SE 1x1 on a pooled map: warned\n",
    "")


def test_binarize_warns_once_per_kind_naming_the_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "net.py").write_text(textwrap.dedent(WARNED))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["binarize", "net.py", "--binary", "*"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3, result.output
    text = " ".join(result.output.split())
    assert "binary conv(s) 3 never see a negative input" in text
    assert "9.fc run on pooled 1x1 maps" in text
    assert "binary depthwise conv(s) 6" in text


def test_a_clean_model_gets_no_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "net.py").write_text(textwrap.dedent(CLEAN))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["binarize", "net.py"])
    assert result.exit_code == 0 and "warning" not in result.output, result.output


def test_dead_model_is_reported_by_export(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(textwrap.dedent(CLEAN))
    run = tmp_path / "run"
    binarize(BinarizeOptions(model=str(tmp_path / "net.py"), run=run))
    healthy = export(run, ("plain",), evaluate_data=False)
    assert healthy.warnings == []
    loaded = load_run_model(RunDir(run)).model
    with torch.no_grad():
        last = loaded.get_submodule("9")
        last.weight.zero_()  # the last conv died: the output no longer depends on the input
    save_weights(RunDir(run).binary_weights, loaded, kind="binary-latent")
    RunDir(run).write_manifest(RunDir(run).read_manifest())  # as binarize records new weights
    result = CliRunner().invoke(app, ["export", "--run", str(run), "--no-evaluate", "-f", "plain"])
    assert result.exit_code == 0, result.output
    assert "warning: the model's output is the same for every input" in " ".join(result.output.split())
    assert json.loads((run / "export-report.json").read_text())["warnings"]


def test_chance_accuracy_is_reported() -> None:
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    assert dead_model_warnings(logits, 0.10) and "at chance for 10 classes" in dead_model_warnings(logits, 0.10)[0]
    assert dead_model_warnings(logits, 0.60) == []


def test_a_shared_conv_counts_every_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.shared = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.shared(self.shared(self.stem(x))))

    costs = layer_costs(Twice(), torch.zeros(1, 1, 8, 8))
    once = 4 * 3 * 3 * 4 * 8 * 8
    assert costs["shared"].calls == 2 and costs["shared"].macs == 2 * once
    assert costs["shared"].params == 4 * 4 * 3 * 3  # the weights exist once
    assert costs["stem"].calls == 1


def test_info_lists_the_datasets_with_their_shapes(cli) -> None:  # type: ignore[no-untyped-def]
    from bnnslim import plugins

    plugins.reset_plugin_manager()  # built-ins only (conftest's setting), whatever an earlier test registered
    result = cli("info", "--datasets")
    assert result.exit_code == 0, result.output
    assert "fashion-mnist-mini" in result.output and "1x28x28" in result.output and "3x32x32" in result.output


GROUPED = """
from torch import nn
INPUT_SHAPE = (1, 8, 8)

def build_model(num_classes=3, in_channels=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.Hardtanh(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(),
        nn.Conv2d(8, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
"""


def test_info_lists_the_convs_prune_keeps_whole_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "net.py").write_text(textwrap.dedent(GROUPED))
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(app, ["binarize", "net.py"]).exit_code == 0
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "not prunable (kept whole by bnnslim prune)" in text
    assert "│ 3 │ grouped or depthwise conv" in text


def test_prune_lists_the_convs_it_keeps_whole_and_warns_about_a_dead_model(tmp_path: Path) -> None:
    """Prune's output and manifest say which convs stay whole and why; a model whose output no longer depends
    on its input (here: the last conv zeroed, no retraining) gets one `warning:` line, not silence."""
    (tmp_path / "net.py").write_text(textwrap.dedent(GROUPED).replace("INPUT_SHAPE = (1, 8, 8)", ""))
    run = tmp_path / "run"
    binarize(BinarizeOptions(model=str(tmp_path / "net.py"), run=run, data="fashion-mnist-mini"))
    quick = ["--select-steps", "1", "--retrain-steps", "0", "--finetune-steps", "0", "--batch-size", "16"]
    result = CliRunner().invoke(app, ["prune", "--keep", "0.6", "--run", str(run), *quick])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "kept whole (not prunable): 3 (grouped or depthwise conv" in text
    assert "the same for every input" not in text  # untrained: at chance (warned), but alive
    assert "3" in json.loads((run / "manifest.json").read_text())["prune"]["unprunable"]

    loaded = load_run_model(RunDir(run)).model
    with torch.no_grad():
        loaded.get_submodule("9").weight.zero_()
        loaded.get_submodule("9").bias.zero_()
    save_weights(RunDir(run).binary_weights, loaded, kind="binary-latent")
    RunDir(run).write_manifest(RunDir(run).read_manifest())
    result = CliRunner().invoke(app, ["prune", "--keep", "0.6", "--run", str(run), *quick])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warned and "the same for every input" in warned[0], result.output
    assert json.loads((run / "manifest.json").read_text())["prune"]["warnings"]
