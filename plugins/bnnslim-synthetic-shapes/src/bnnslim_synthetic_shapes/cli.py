"""``bnnslim shapes-export DIR``: the dataset as PNG files, for ``--data folder`` or a look at the images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SPLIT_DIRS = {"train": "train", "test": "val"}  # the layout of bnnslim's `folder` dataset


def shapes_export(
    out: Annotated[Path, typer.Argument(help="Folder to write train/<class>/*.png and val/<class>/*.png into.")],
    dataset: Annotated[str, typer.Option(help="shapes (3x32x32) or shapes-gray (1x28x28).")] = "shapes",
    per_class: Annotated[int, typer.Option(min=1, help="Images per class and split (at most the dataset's).")] = 10,
) -> None:
    """Write the first PER_CLASS images of each class of both splits as PNG files."""
    from bnnslim.errors import BnnslimError
    from bnnslim_synthetic_shapes.dataset import DATASETS, build

    if dataset not in DATASETS:
        raise BnnslimError(f"unknown shapes dataset '{dataset}'", f"choose one of: {', '.join(DATASETS)}")
    try:
        from PIL import Image
    except ImportError as exc:
        raise BnnslimError("shapes-export needs Pillow", "pip install pillow") from exc
    splits = build(dataset)
    written = 0
    for split, ds in (("train", splits.train), ("test", splits.test)):
        for c, cls in enumerate(ds.classes):
            folder = out / SPLIT_DIRS[split] / cls
            folder.mkdir(parents=True, exist_ok=True)
            for k, i in enumerate((ds.labels == c).nonzero().flatten()[:per_class].tolist()):
                img = ds.images[i]
                array = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
                Image.fromarray(array).save(folder / f"{k:05d}.png")
                written += 1
    typer.echo(f"wrote {written} images to {out} (train/ and val/, {len(splits.train.classes)} classes)")
