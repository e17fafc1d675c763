"""The README's commands work: every ```bash block is run as a user would, in order.

``pip install`` steps are skipped (CI has just done them); ``text`` blocks are
illustrations with placeholders (your model, ImageNet, a GPU cluster).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def commands() -> list[str]:
    found = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if not line or line.startswith("#"):
                continue
            parts = [c.strip() for c in line.split("&&")]
            found += [c for c in parts if not c.startswith("pip install")]
    return found


def test_ci_runs_the_readme_test_command() -> None:
    quick = blocks("bash")[0]
    assert 'pip install -e ".[runtime]" && bnnslim binarize' in quick, "the first command runs the main job"
    test_line = next(line for line in quick.splitlines() if "python -m pytest" in line)
    installed = test_line.split("&&")[0].split()[2:]  # what `pip install` gets
    ci = (REPO / ".ci" / "run").read_text()
    assert all(item in ci for item in installed), f"CI must install {installed}"
    assert "python3 -m pytest" in ci


def test_the_best_binarize_recipe_in_the_readme_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe the README recommends (an hour on full Fashion-MNIST), shortened to a few steps per phase."""
    from typer.testing import CliRunner

    from bnnslim.cli.app import app

    recipe = next(line.strip() for block in blocks("text") for line in block.splitlines()
                  if "--real-weight-epochs" in line)
    args = recipe.split()[1:]
    assert args[:2] == ["binarize", "bnnslim:small-cnn"]
    quick = {"--data": "fashion-mnist-mini", "--teacher-epochs": "1", "--real-weight-epochs": "1", "--epochs": "1"}
    for i, word in enumerate(args[:-1]):
        if word in quick:
            args[i + 1] = quick[word]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*args, "--steps-per-epoch", "2", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert "step 2 of 2" in result.output and "binary test accuracy" in result.output


@pytest.mark.slow
def test_readme_commands_run(tmp_path: Path) -> None:
    # no examples/ folder: the quick start must work from an installed package alone
    env = {**os.environ, "BNNSLIM_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    env.pop("BNNSLIM_DISABLE_EXTERNAL_PLUGINS", None)  # the README shows the installed plugins
    bin_dir = Path(sys.executable).parent
    for command in commands():
        if command.startswith("python -m pytest"):
            continue  # that is this suite
        result = subprocess.run(command, shell=True, cwd=tmp_path, env={**env, "PATH": f"{bin_dir}:{env['PATH']}"},
                                capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, (f"README command failed: {command}\n{result.stdout[-2000:]}\n"
                                        f"{result.stderr[-2000:]}")
    for snippet in blocks("python"):
        result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, f"README snippet failed:\n{snippet}\n{result.stderr[-2000:]}"
    assert (tmp_path / "bnnslim-run" / "model.bnn.safetensors").is_file()
