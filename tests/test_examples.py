"""The notebook-style example prunes a torchvision model with the user's own loop and no run directory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "prune_torchvision.py"


@pytest.mark.slow
def test_prune_torchvision_example_runs_without_a_run_directory(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("prune_torchvision", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # our own example file
    result = module.main(steps=2, keep=0.5)
    assert result["parameters after"] < 0.5 * result["parameters before"]
    assert result["reloaded accuracy"] == result["slim accuracy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet18-slim.bnn.safetensors"]
