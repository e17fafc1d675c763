"""The datasets the plugin offers, and their (cached) construction."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from bnnslim.plugin_types import DatasetSplits
from bnnslim_synthetic_shapes.generate import CLASSES, draw_shapes

MEAN, STD = 0.5, 0.25  # pixels in [0, 1] are normalised to (x - MEAN) / STD
TRAIN_SEED, TEST_SEED = 0, 1  # different seeds: no test image is a train image


@dataclass(frozen=True)
class ShapesConfig:
    size: int
    channels: int
    train: int = 5000
    test: int = 1000


DATASETS: dict[str, ShapesConfig] = {
    "shapes": ShapesConfig(size=32, channels=3),
    "shapes-gray": ShapesConfig(size=28, channels=1),
}


class ShapesImages(Dataset):
    """uint8 images kept as they are drawn, normalised item by item: ``(float [C,H,W], int)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.classes = list(CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return (self.images[i].float() / 255 - MEAN) / STD, int(self.labels[i])


@functools.lru_cache(maxsize=4)
def _split(n: int, size: int, channels: int, seed: int) -> ShapesImages:
    return ShapesImages(*draw_shapes(n, size, channels, seed))


def build(name: str, root: Path | None = None) -> DatasetSplits:
    """The train and test splits of dataset ``name``; ``root`` (``--data-root``) is not needed and ignored."""
    cfg = DATASETS[name]
    return DatasetSplits(train=_split(cfg.train, cfg.size, cfg.channels, TRAIN_SEED),
                         test=_split(cfg.test, cfg.size, cfg.channels, TEST_SEED))
