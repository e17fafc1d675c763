"""Built-in datasets, offered through the ``bnnslim_datasets`` hook.

The builders live in :mod:`bnnslim.data.builtin` and import torchvision only when
called. ``num_classes=0`` (the ``folder`` dataset) means "determined from the
data": the built splits expose ``.classes``.
"""

from __future__ import annotations

from collections.abc import Iterator

from bnnslim.hookspecs import hookimpl
from bnnslim.plugin_types import DatasetSpec

FOUND_FROM_DATA = 0  # num_classes of a dataset whose classes are the folders found under its root


@hookimpl
def bnnslim_datasets() -> Iterator[DatasetSpec]:
    from bnnslim.data import builtin  # torch: imported only when datasets are asked for

    yield DatasetSpec(
        name="fashion-mnist-mini",
        description="Fashion-MNIST subset bundled with bnnslim: 6000 train / 1000 test 28x28 grey images, "
        "600/100 per class (Zalando SE, MIT licence); no download, no --data-root",
        input_shape=(1, 28, 28),
        num_classes=10,
        build=builtin.build_fashion_mnist_mini,
    )
    yield DatasetSpec(
        name="fashion-mnist",
        description="Fashion-MNIST, 60000 train / 10000 test (Zalando SE, MIT licence): torchvision under "
        "--data-root, or the Debian package dataset-fashion-mnist when present",
        input_shape=(1, 28, 28),
        num_classes=10,
        build=builtin.build_fashion_mnist,
    )
    yield DatasetSpec(
        name="mnist",
        description="MNIST handwritten digits, 60000 train / 10000 test: torchvision under --data-root",
        input_shape=(1, 28, 28),
        num_classes=10,
        build=builtin.build_mnist,
        needs_root=True,
    )
    yield DatasetSpec(
        name="cifar10",
        description="CIFAR-10, 50000 train / 10000 test 32x32 colour images: torchvision under --data-root",
        input_shape=(3, 32, 32),
        num_classes=10,
        build=builtin.build_cifar10,
        needs_root=True,
    )
    yield DatasetSpec(
        name="imagenet",
        description="ImageNet ILSVRC-2012: --data-root holds train/<class>/ and val/<class>/ (1000 classes), "
        "224x224 crops",
        input_shape=(3, 224, 224),
        num_classes=builtin.IMAGENET_NUM_CLASSES,
        build=builtin.build_imagenet,
        needs_root=True,
    )
    yield DatasetSpec(
        name="folder",
        description="any image collection: --data-root holds train/<class>/ and val/<class>/ (or test/); "
        "resized and centre-cropped to the model's input shape (INPUT_SHAPE or --input-shape; 3x224x224 when "
        "neither is given); classes found from the folders",
        input_shape=(3, 224, 224),
        num_classes=FOUND_FROM_DATA,
        build=builtin.build_folder,
        needs_root=True,
        build_at=builtin.build_folder_at,
    )
