"""The example models shipped inside the package: ``bnnslim:NAME`` works without any model file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnnslim import zoo
from bnnslim.errors import BnnslimError
from bnnslim.model_source import load_model_source


@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_model_builds_for_the_dataset_sizes(name: str) -> None:
    source = load_model_source(f"bnnslim:{name}")
    model = source.build(num_classes=7, in_channels=2).eval()
    _, h, w = zoo.module_of(name).INPUT_SHAPE  # type: ignore[union-attr]
    with torch.no_grad():
        out = model(torch.randn(2, 2, h, w))
    assert out.shape == (2, 7)


def test_tiny_variant_is_smaller() -> None:
    full = load_model_source("bnnslim:vgg11").build(10, 3)
    tiny = load_model_source("bnnslim:vgg11-tiny").build(10, 3)
    assert sum(p.numel() for p in tiny.parameters()) < sum(p.numel() for p in full.parameters()) / 2


def test_unknown_zoo_name_lists_the_models() -> None:
    with pytest.raises(BnnslimError) as info:
        load_model_source("bnnslim:resnet19").build(10, 3)
    assert "resnet18" in str(info.value)


def test_examples_folder_points_at_the_shipped_files() -> None:
    repo = Path(__file__).resolve().parents[1]
    for module in zoo.MODELS.values():
        assert (repo / "examples" / f"{module}.py").resolve() == repo / "bnnslim" / "zoo" / f"{module}.py"


def test_a_folder_named_like_the_source_does_not_hide_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bnnslim").mkdir()  # e.g. a clone of this repository, or a run called bnnslim
    monkeypatch.chdir(tmp_path)
    assert load_model_source("bnnslim:small-cnn").build(10, 1) is not None
