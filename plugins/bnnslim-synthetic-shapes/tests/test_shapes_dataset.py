"""The synthetic shapes: deterministic, balanced, distinct classes, the dataset contract bnnslim expects."""

from __future__ import annotations

import pytest
import torch
from bnnslim_synthetic_shapes.dataset import DATASETS, MEAN, STD, build
from bnnslim_synthetic_shapes.generate import CLASSES, _inside, draw_shapes

torch.set_num_threads(1)  # tiny tensors: a second thread only waits for a core on a shared machine


def test_same_seed_same_bytes_other_seed_other_images() -> None:
    x1, y1 = draw_shapes(50, 16, 3, seed=7)
    x2, y2 = draw_shapes(50, 16, 3, seed=7)
    x3, _ = draw_shapes(50, 16, 3, seed=8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.dtype == torch.uint8 and x1.shape == (50, 3, 16, 16) and y1.dtype == torch.int64


def test_classes_are_balanced() -> None:
    _, y = draw_shapes(1003, 8, 1, seed=0)
    counts = torch.bincount(y, minlength=len(CLASSES))
    assert counts.max() - counts.min() <= 1


def test_every_class_draws_a_distinct_shape() -> None:
    ys, xs = torch.meshgrid(torch.linspace(-1.1, 1.1, 41), torch.linspace(-1.1, 1.1, 41), indexing="ij")
    masks = [_inside(cls, xs, ys) for cls in CLASSES]
    for m in masks:
        assert 0.05 < m.float().mean() < 0.8  # a shape, neither empty nor the whole square
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            differ = (masks[i] ^ masks[j]).float().mean()
            assert differ > 0.05, f"{CLASSES[i]} and {CLASSES[j]} look alike"


def test_shape_and_background_contrast() -> None:
    x, _ = draw_shapes(200, 32, 3, seed=3)
    lum = x.float().mean(1) / 255  # [n, H, W]
    spread = lum.flatten(1).quantile(0.95, dim=1) - lum.flatten(1).quantile(0.05, dim=1)
    assert (spread > 0.2).all()


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_splits_follow_the_dataset_contract(name: str) -> None:
    cfg = DATASETS[name]
    splits = build(name, None)
    assert (len(splits.train), len(splits.test)) == (cfg.train, cfg.test)
    x, y = splits.train[0]
    assert x.shape == (cfg.channels, cfg.size, cfg.size) and x.dtype == torch.float32 and isinstance(y, int)
    assert splits.train.classes == list(CLASSES)
    assert not torch.equal(splits.train.images[: cfg.test], splits.test.images)  # other seed
    raw = splits.train.images[0].float() / 255
    assert torch.allclose(x, (raw - MEAN) / STD)
    assert build(name, None).train is splits.train  # generated once per process
