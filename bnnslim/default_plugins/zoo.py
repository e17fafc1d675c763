"""Built-in model source: the example models shipped in :mod:`bnnslim.zoo`, ``bnnslim:NAME``.

``bnnslim binarize bnnslim:small-cnn --data fashion-mnist-mini`` needs no model
file: the installed package holds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from bnnslim import zoo
from bnnslim._version import __version__
from bnnslim.errors import BnnslimError
from bnnslim.hookspecs import hookimpl
from bnnslim.plugin_types import ModelSourceSpec

if TYPE_CHECKING:
    from torch import nn  # the zoo's modules import torch when a model is built, not when plugins load


@hookimpl
def bnnslim_model_sources() -> Iterator[ModelSourceSpec]:
    yield ModelSourceSpec(
        name="bnnslim",
        description="the example models shipped with bnnslim: " + ", ".join(f"bnnslim:{n}" for n in zoo.MODELS)
        + f" (and NAME{zoo.TINY_SUFFIX}, half width)",
        build=build_zoo_model,
        list_models=zoo.names,
        input_shape=zoo_input_shape,
        version=f"bnnslim {__version__}",
    )


def zoo_input_shape(name: str) -> tuple[int, ...] | None:
    module = zoo.module_of(name)
    return tuple(module.INPUT_SHAPE) if module is not None else None


def build_zoo_model(name: str, num_classes: int | None, in_channels: int | None) -> nn.Module:
    """``build_model`` (or ``tiny`` for ``NAME-tiny``) of the zoo module, with the dataset's sizes."""
    module = zoo.module_of(name)
    if module is None:
        raise BnnslimError(f"bnnslim has no example model '{name}'", f"choose from {', '.join(zoo.names())}")
    factory = module.tiny if name.endswith(zoo.TINY_SUFFIX) else module.build_model
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if v}
    model: nn.Module = factory(**kwargs)
    return model
