"""The real entry-point path: the plugin distributions in ``plugins/`` and the guide's minimal plugin,
used from the command line.

Install the plugins first (``.ci/run`` does)::

    pip install --no-build-isolation -e plugins/bnnslim-fpgm -e plugins/bnnslim-synthetic-shapes
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomllib
from _helpers import QUICK, TINY_MODEL
from typer.testing import Result

from bnnslim import plugins
from bnnslim.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "plugins.md"


def installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs = {
    dist: pytest.mark.skipif(not installed(dist), reason=f"pip install -e plugins/{dist} (.ci/run installs it)")
    for dist in ("bnnslim-fpgm", "bnnslim-synthetic-shapes")
}


@pytest.fixture
def external(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Installed plugins load (conftest blocks them for every other test)."""
    monkeypatch.delenv(plugins.DISABLE_EXTERNAL_ENV, raising=False)
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()


def copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


@needs["bnnslim-fpgm"]
@needs["bnnslim-synthetic-shapes"]
def test_plugins_command_shows_the_installed_distributions(external: None, cli: Callable[..., Result]) -> None:
    result = cli("plugins", "--json")
    assert result.exit_code == 0, result.output
    by_name = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert by_name["fpgm"]["distribution"] == "bnnslim-fpgm" and by_name["fpgm"]["version"] == "0.1.0"
    assert by_name["fpgm"]["provides"] == {"bnnslim_strategies": ["fpgm", "fpgm-binary"]}
    shapes = by_name["synthetic-shapes"]
    assert shapes["distribution"] == "bnnslim-synthetic-shapes"
    assert shapes["provides"] == {"bnnslim_datasets": ["shapes", "shapes-gray"], "bnnslim_commands": ["shapes-export"]}
    table = cli("plugins").stdout
    assert "bnnslim-fpgm" in table and "strategies: fpgm, fpgm-binary" in table


@needs["bnnslim-fpgm"]
@pytest.mark.parametrize("strategy", ["fpgm", "fpgm-binary"])
def test_prune_with_the_fpgm_plugin_from_the_command_line(external: None, tiny_run: Path, tmp_path: Path,
                                                          cli: Callable[..., Result], strategy: str) -> None:
    run = copy_run(tiny_run, tmp_path)
    result = cli("prune", "--run", run, "--keep", "0.5", "--strategy", strategy, *QUICK)
    assert result.exit_code == 0, result.output
    assert "50.0%" in result.stdout
    assert RunDir(run).read_manifest()["prune"]["strategy"] == strategy
    from safetensors import safe_open

    with safe_open(str(run / "pruned.safetensors"), framework="pt") as f:
        assert {"state.fpgm_distance.1.0", "state.fpgm_distance.3.0"} <= set(f.keys())  # the plugin's own state
    exported = cli("export", "--run", run, "--format", "plain", "--no-evaluate")
    assert exported.exit_code == 0, exported.output
    assert "slim == masked" in exported.stdout


@needs["bnnslim-fpgm"]
def test_unknown_strategy_lists_the_plugin_strategies(external: None, tiny_run: Path, tmp_path: Path,
                                                      cli: Callable[..., Result]) -> None:
    result = cli("prune", "--run", copy_run(tiny_run, tmp_path), "--keep", "0.5", "--strategy", "fpmg")
    assert result.exit_code == 1
    assert "fpgm, fpgm-binary" in result.stderr


@needs["bnnslim-synthetic-shapes"]
def test_binarize_on_the_shapes_dataset_from_the_command_line(external: None, tmp_path: Path,
                                                              cli: Callable[..., Result]) -> None:
    (tmp_path / "tiny.py").write_text(textwrap.dedent(TINY_MODEL))
    result = cli("binarize", "tiny.py", "--run", "run", "--data", "shapes", "--epochs", "1",
                 "--steps-per-epoch", "3", "--batch-size", "32")
    assert result.exit_code == 0, result.output
    manifest = RunDir(tmp_path / "run").read_manifest()
    assert manifest["dataset"]["name"] == "shapes"
    assert manifest["input_shape"] == [3, 32, 32] and manifest["model"]["in_channels"] == 3


@needs["bnnslim-synthetic-shapes"]
def test_plugin_command_through_the_bnnslim_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(plugins.DISABLE_EXTERNAL_ENV, raising=False)
    script = Path(sys.executable).with_name("bnnslim")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "bnnslim"]
    proc = subprocess.run([*command, "shapes-export", str(tmp_path / "out"), "--per-class", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 20 images" in proc.stdout
    assert len(list((tmp_path / "out" / "train").glob("*/*.png"))) == 10
    assert len(list((tmp_path / "out" / "val").glob("*/*.png"))) == 10


# -- the guide's minimal plugin, installed from the files it shows ---------------------------------------------


def guide_files() -> dict[str, str]:
    """The files of the guide's minimal plugin: each code block after ``<!-- file: PATH -->``."""
    text = GUIDE.read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, re.DOTALL)}


def install_as_dist_info(project: Path, site: Path) -> str:
    """What ``pip install`` leaves for the entry points: a ``.dist-info`` with ``entry_points.txt``."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    groups = meta["entry-points"]
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items()))
    for package in project.iterdir():
        if package.is_dir():
            shutil.copytree(package, site / package.name)
    return meta["name"]


def test_the_guides_minimal_plugin_works_through_its_entry_point(
        external: None, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        cli: Callable[..., Result]) -> None:
    files = guide_files()
    assert set(files) == {"bnnslim-l2/pyproject.toml", "bnnslim-l2/bnnslim_l2/__init__.py"}
    for rel, content in files.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_text(content)
    dist = install_as_dist_info(tmp_path / "src" / "bnnslim-l2", tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    try:
        listed = {p["name"]: p for p in json.loads(cli("plugins", "--json").stdout)["plugins"]}
        assert listed["l2"]["distribution"] == dist == "bnnslim-l2"
        assert listed["l2"]["provides"] == {"bnnslim_strategies": ["l2"]}
        run = copy_run(tiny_run, tmp_path)
        result = cli("prune", "--run", run, "--keep", "0.5", "--strategy", "l2", *QUICK)
        assert result.exit_code == 0, result.output
    finally:
        sys.modules.pop("bnnslim_l2", None)
