"""Shared fixtures: the CLI runner, model files in tmp_path, schemes, tiny datasets."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset
from typer.testing import CliRunner, Result

from bnnslim.plugin_types import DatasetSplits, SchemeSpec

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
#: the example model files (examples/*.py link to them; examples/ also holds API scripts)
EXAMPLE_FILES = sorted(EXAMPLES / p.name for p in (REPO / "bnnslim" / "zoo").glob("[!_]*.py"))
SMALL_CNN = EXAMPLES / "small_cnn.py"
BUNDLED = "fashion-mnist-mini"

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


def builtin_scheme(name: str) -> SchemeSpec:
    """A built-in scheme, read from the built-in plugin module itself (no plugin manager needed)."""
    from bnnslim.default_plugins.schemes import bnnslim_schemes

    return next(s for s in bnnslim_schemes() if s.name == name)


@pytest.fixture
def write_model(tmp_path: Path) -> Callable[..., Path]:
    """Write a model file into tmp_path: ``write_model(source, name="net.py")`` -> its path."""

    def write(source: str, name: str = "net.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
        return path

    return write


# A small model file as a user writes it: 1x8x8 inputs, 4 classes, three convs so
# that the middle one is binary under the first/last rule.
TOY_MODEL = """
    import torch
    from torch import nn

    INPUT_SHAPE = (1, 8, 8)

    def build_model(num_classes: int = 4, in_channels: int = 1) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(),
            nn.Conv2d(8, num_classes, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
"""


@pytest.fixture
def toy_model_file(write_model: Callable[..., Path]) -> Path:
    return write_model(TOY_MODEL, "toy.py")


def toy_splits(n_train: int = 256, n_test: int = 128, shape: tuple[int, ...] = (1, 8, 8),
               classes: int = 4, seed: int = 0) -> DatasetSplits:
    """A learnable synthetic task: the class decides which quadrant is bright."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> TensorDataset:
        y = torch.randint(0, classes, (n,), generator=g)
        x = 0.3 * torch.randn(n, *shape, generator=g)
        h, w = shape[1] // 2, shape[2] // 2
        for c in range(classes):
            r, col = divmod(c, 2)
            x[y == c, :, r * h:(r + 1) * h, col * w:(col + 1) * w] += 1.5
        return TensorDataset(x, y)

    return DatasetSplits(train=make(n_train), test=make(n_test))


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


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` with its bytes (None when ``path`` does not exist)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_clean_error(result: Result, *words: str) -> str:
    """Exit code != 0, one line on stderr naming the problem (``words``), no traceback."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    return line

