"""bnnslim-synthetic-shapes: a synthetic image-classification dataset that needs no download.

Ten classes of shapes (circle, ring, square, frame, triangle, diamond, plus,
cross, horizontal and vertical stripes) in random colours, positions and sizes,
with pixel noise, drawn deterministically from a seed:

- ``--data shapes``: 3x32x32 colour images (CIFAR-10's shape), 5000 train / 1000 test;
- ``--data shapes-gray``: 1x28x28 grey images (MNIST's shape), 5000 train / 1000 test.

It also adds ``bnnslim shapes-export DIR``, which writes the images as PNG files
in the ``train/<class>/`` and ``val/<class>/`` layout of ``--data folder``.

This module is imported whenever ``bnnslim`` starts: torch is imported only in
the builders and the command.
"""

from __future__ import annotations

from collections.abc import Iterator

from bnnslim.hookspecs import hookimpl
from bnnslim.plugin_types import CommandSpec, DatasetSpec

__version__ = "0.1.0"


@hookimpl
def bnnslim_datasets() -> Iterator[DatasetSpec]:
    from bnnslim_synthetic_shapes.dataset import DATASETS, build

    for name, cfg in DATASETS.items():
        yield DatasetSpec(
            name=name,
            description=f"synthetic shapes, 10 classes, {cfg.channels}x{cfg.size}x{cfg.size} "
            f"{'colour' if cfg.channels == 3 else 'grey'}, {cfg.train} train / {cfg.test} test, "
            "generated from a seed (no download, no --data-root)",
            input_shape=(cfg.channels, cfg.size, cfg.size),
            num_classes=10,
            build=lambda root, name=name: build(name, root),
        )


@hookimpl
def bnnslim_commands() -> Iterator[CommandSpec]:
    from bnnslim_synthetic_shapes.cli import shapes_export

    yield CommandSpec(
        name="shapes-export",
        help="Write a synthetic shapes dataset as PNG files in train/<class>/ and val/<class>/ (for --data folder).",
        callback=shapes_export,
    )
