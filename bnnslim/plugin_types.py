"""The typed objects that plugins return from bnnslim's hooks.

Each hook in :mod:`bnnslim.hookspecs` returns an iterable of one of these
dataclasses. They are plain data with callables, so a plugin needs nothing from
bnnslim but this module to describe what it offers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports only for type checkers
    import torch
    from torch.utils.data import Dataset


@dataclass(frozen=True)
class DatasetSplits:
    """The train and test splits of an image classification dataset.

    Items are ``(image_tensor[C,H,W] float, label int)`` pairs.
    """

    train: "Dataset"
    test: "Dataset"


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset that ``--data NAME`` selects.

    ``build(root)`` returns the splits; ``root`` is ``--data-root`` (``None`` when
    the user gave none). It must raise :class:`bnnslim.errors.BnnslimError` with a
    fix when the data is missing or in the wrong layout.
    """

    name: str
    description: str
    input_shape: tuple[int, int, int]
    num_classes: int
    build: Callable[[Path | None], DatasetSplits]
    needs_root: bool = False


@dataclass(frozen=True)
class SchemeSpec:
    """A binarization scheme that ``--scheme NAME`` selects.

    ``binarize_input(x)`` maps activations to {-1, +1} (0 stays 0) with a
    straight-through gradient. ``binarize_weight(w)`` maps latent weights
    ``[out, in, kh, kw]`` to {-1, +1}. ``scale(w, kept)`` returns the per-filter
    scale ``[out, 1, 1, 1]`` or ``None`` for no scale; ``kept`` (0/1, broadcast to
    ``[out, in, 1, 1]``, or ``None`` for all) marks the input channels that are
    kept: the scale must depend on those only, so that physically removing the
    masked inputs leaves it unchanged (see :func:`bnnslim.binary.ste.mean_abs_scale`).
    """

    name: str
    description: str
    binarize_input: Callable[["torch.Tensor"], "torch.Tensor"]
    binarize_weight: Callable[["torch.Tensor"], "torch.Tensor"]
    scale: Callable[["torch.Tensor", "torch.Tensor | None"], "torch.Tensor | None"]
