"""What several test modules share: paths, model sources, tiny datasets and the clean-error check.

Plain values and functions (fixtures live in conftest.py); test modules import
them with ``from _helpers import ...``, never from conftest or from each other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from typer.testing import Result

from bnnslim.plugin_types import DatasetSplits, SchemeSpec

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
#: the example model files (examples/*.py link to them; examples/ also holds API scripts)
EXAMPLE_FILES = sorted(EXAMPLES / p.name for p in (REPO / "bnnslim" / "zoo").glob("[!_]*.py"))
SMALL_CNN = EXAMPLES / "small_cnn.py"
BUNDLED = "fashion-mnist-mini"

# A tiny file-based CNN for CLI runs: 1x28x28 (the bundled data), two prunable groups.
TINY_MODEL = """
    from torch import nn

    INPUT_SHAPE = (1, 28, 28)

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.Hardtanh())

    def build_model(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
        return nn.Sequential(block(in_channels, 8), block(8, 8), nn.MaxPool2d(2), block(8, 8),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
"""
QUICK = ("--select-steps", "2", "--retrain-steps", "2", "--batch-size", "32")


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


def builtin_scheme(name: str) -> SchemeSpec:
    """A built-in scheme, read from the built-in plugin module itself (no plugin manager needed)."""
    from bnnslim.default_plugins.schemes import bnnslim_schemes

    return next(s for s in bnnslim_schemes() if s.name == name)


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
