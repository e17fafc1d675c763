"""Example models that ship with bnnslim, as ordinary PyTorch model files.

Each module is what a user's own model file looks like (``INPUT_SHAPE``, a
``build_model`` factory, a half-width ``tiny`` variant) and imports nothing from
bnnslim. They are installed with the package, so ``bnnslim binarize
bnnslim:small-cnn`` works right after ``pip install bnnslim``; in a clone of
the repository ``examples/*.py`` point at the same files.

* ``small-cnn``: four conv blocks for 28x28 grey images (Fashion-MNIST);
* ``nin``: Network-in-Network (Lin et al. 2014), the model Xu et al. prune;
* ``vgg11``: VGG-11 with BatchNorm for 32x32 inputs;
* ``resnet18``: ResNet-18 for 32x32 inputs (CIFAR layout).

``NAME-tiny`` builds the half-width variant (fast tests and demos).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: model name -> module of this package
MODELS: dict[str, str] = {"small-cnn": "small_cnn", "nin": "nin", "vgg11": "vgg11", "resnet18": "resnet18"}
TINY_SUFFIX = "-tiny"


def names() -> list[str]:
    """Every model name the zoo builds, full and tiny."""
    return [n for base in MODELS for n in (base, base + TINY_SUFFIX)]


def module_of(name: str) -> ModuleType | None:
    """The module defining ``name`` (``NAME`` or ``NAME-tiny``), or ``None`` for an unknown name."""
    base = name.removesuffix(TINY_SUFFIX)
    return importlib.import_module(f"{__name__}.{MODELS[base]}") if base in MODELS else None
