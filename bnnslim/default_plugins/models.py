"""Built-in model source: torchvision's image classification models, ``torchvision:NAME``.

``bnnslim binarize torchvision:resnet18 --data cifar10`` builds
``torchvision.models.get_model("resnet18", weights=None, num_classes=10)``.
Weights are random: torchvision's pretrained weights need a download, so give
trained ones with ``--weights FILE``. When the dataset has other than 3 input
channels (Fashion-MNIST: 1), the first 3-channel conv is replaced by one with as
many inputs, with the same hyper-parameters. torchvision is imported only when a
model is built or listed.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Iterator
from typing import cast

from bnnslim.hookspecs import hookimpl
from bnnslim.plugin_types import ModelSourceSpec

TORCHVISION_INPUT_SHAPE = (3, 224, 224)
_INPUT_SHAPES = {"inception_v3": (3, 299, 299)}
#: Keyword arguments some models need to return a plain tensor of logits and to stay quiet.
_EXTRA_KWARGS: dict[str, dict[str, object]] = {
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"aux_logits": False, "init_weights": True},
}


@hookimpl
def bnnslim_model_sources() -> Iterator[ModelSourceSpec]:
    yield ModelSourceSpec(
        name="torchvision",
        description="torchvision's image classification models with random weights (load trained ones with "
        "--weights): torchvision:resnet18, torchvision:vgg11_bn, torchvision:mobilenet_v2, ...",
        build=build_torchvision_model,
        list_models=list_torchvision_models,
        input_shape=torchvision_input_shape,
        version=_version("torchvision"),
    )


def _version(dist: str) -> str:
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} not installed"


@functools.cache
def _names() -> tuple[str, ...]:
    from torchvision import models

    return tuple(models.list_models(module=models))


def list_torchvision_models() -> list[str]:
    """The names of torchvision's classification models (``torchvision.models.list_models``)."""
    return list(_names())


def torchvision_input_shape(name: str) -> tuple[int, ...]:
    """The input size the model was designed for (``(3, 224, 224)`` for most)."""
    return _INPUT_SHAPES.get(name, TORCHVISION_INPUT_SHAPE)


def build_torchvision_model(name: str, num_classes: int | None, in_channels: int | None):
    """``torchvision.models.get_model(name, weights=None, num_classes=...)`` adapted to ``in_channels``."""
    from torchvision import models

    from bnnslim.errors import BnnslimError

    if name not in _names():
        raise BnnslimError(f"torchvision has no classification model '{name}'",
                           "list them with `python -c \"import torchvision; print(torchvision.models.list_models())\"`")
    kwargs = dict(_EXTRA_KWARGS.get(name, {}))
    if num_classes:
        kwargs["num_classes"] = num_classes
    model = models.get_model(name, weights=None, **kwargs)
    if in_channels and in_channels != 3:
        _adapt_first_conv(model, name, in_channels)
    return model


def _adapt_first_conv(model, name: str, in_channels: int) -> None:
    """Replace the first conv that reads the 3 colour channels by one that reads ``in_channels``."""
    from torch import nn

    from bnnslim.errors import BnnslimError

    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            # torch types the attributes of every _ConvNd as tuple[int, ...]; a Conv2d's are pairs
            pair = tuple[int, int]
            new = nn.Conv2d(in_channels, module.out_channels, cast(pair, module.kernel_size),
                            stride=cast(pair, module.stride), padding=cast("str | tuple[int, int]", module.padding),
                            dilation=cast(pair, module.dilation), bias=module.bias is not None,
                            padding_mode=module.padding_mode)
            parent_name, _, attr = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
            return
    raise BnnslimError(f"torchvision:{name} has no 3-channel first conv to adapt to {in_channels} input channels",
                       "use a dataset with 3 channels, or another model")
