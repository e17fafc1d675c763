"""Builders of the built-in datasets: ``build(root) -> DatasetSplits``.

torchvision is imported inside the builders only, so importing this module (and
``bnnslim --help``) stays fast. Every expected failure (no ``--data-root``, a
missing folder, a wrong layout, a failed download) raises
:class:`~bnnslim.errors.BnnslimError` naming the path and the expected layout.

Downloads: torchvision's ``download=True`` is the normal path. Set
``BNNSLIM_OFFLINE=1`` to never touch the network (only files already on disk
are used); each download's sockets time out after :data:`DOWNLOAD_TIMEOUT_S`.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.resources
import json
import logging
import os
import socket
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import Dataset, TensorDataset

from bnnslim.data.idx import read_idx
from bnnslim.errors import BnnslimError
from bnnslim.plugin_types import DatasetSplits

log = logging.getLogger(__name__)
T = TypeVar("T")

FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_NUM_CLASSES = 1000
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(d) for d in range(10))

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
BUNDLED_FILE = "fashion_mnist_mini.safetensors.gz"
OFFLINE_ENV = "BNNSLIM_OFFLINE"
DOWNLOAD_TIMEOUT_S = 60.0
IDX_FILES = {  # split -> (images, labels), as named by the original distributions
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGENET_LAYOUT = "ROOT/train/<class>/<image> and ROOT/val/<class>/<image>"
FOLDER_LAYOUT = "ROOT/train/<class>/<image> and ROOT/val/<class>/<image> (or ROOT/test/<class>/<image>)"


class Uint8Images(Dataset):
    """Grey uint8 images ``[N,H,W]`` served as normalised float ``[1,H,W]`` with int labels."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, classes: Sequence[str]
    ) -> None:
        self.images, self.labels = images, labels.to(torch.int64)
        self.mean, self.std, self.classes = mean, std, list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)
        return x.unsqueeze(0), int(self.labels[i])


def normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 ``[N,H,W]`` -> float32 ``[N,1,H,W]``, ``(x/255 - mean) / std``."""
    return images.to(torch.float32).div_(255.0).sub_(mean).div_(std).unsqueeze(1)


# --- the bundled subset ---------------------------------------------------------------------------


@functools.cache
def _bundled_bytes() -> bytes:
    """The decompressed safetensors bytes of the bundled file (read once per process)."""
    resource = importlib.resources.files("bnnslim.data").joinpath(BUNDLED_FILE)
    try:
        return gzip.decompress(resource.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise BnnslimError(
            f"the bundled dataset file bnnslim/data/{BUNDLED_FILE} is missing or damaged ({exc})",
            "reinstall bnnslim (or rebuild it with scripts/make_bundled_dataset.py)",
        ) from exc


def bundled_tensors() -> dict[str, torch.Tensor]:
    """The tensors of the bundled file (``train_images`` uint8 ``[N,28,28]``, ``train_labels``, ...)."""
    from safetensors.torch import load

    return load(_bundled_bytes())


def bundled_metadata() -> dict[str, str]:
    """The provenance recorded in the bundled file (source package, file hashes, licence, ...)."""
    blob = _bundled_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return dict(json.loads(blob[8 : 8 + n]).get("__metadata__", {}))


def build_fashion_mnist_mini(root: Path | None = None) -> DatasetSplits:
    """The bundled class-balanced Fashion-MNIST subset (6000 train / 1000 test); ``root`` is ignored."""
    t = bundled_tensors()
    splits = []
    for split in ("train", "test"):
        x = normalise(t[f"{split}_images"], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        ds = TensorDataset(x, t[f"{split}_labels"].to(torch.int64))
        ds.classes = list(FASHION_MNIST_CLASSES)  # type: ignore[attr-defined]
        splits.append(ds)
    return DatasetSplits(train=splits[0], test=splits[1])


# --- MNIST-like IDX datasets ----------------------------------------------------------------------


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Give sockets opened inside a default timeout (torchvision's downloads set none)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_idx_splits(folder: Path, mean: float, std: float, classes: Sequence[str]) -> DatasetSplits | None:
    """The splits from the four IDX files in ``folder`` (gzipped or not), or ``None`` if any is missing."""
    found = {s: [_find_idx(folder, stem) for stem in stems] for s, stems in IDX_FILES.items()}
    if any(p is None for paths in found.values() for p in paths):
        return None
    splits = []
    for split, (img_path, lab_path) in found.items():
        images, labels = read_idx(img_path), read_idx(lab_path)  # type: ignore[arg-type]
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise BnnslimError(
                f"the {split} IDX files in {folder} do not match: images {tuple(images.shape)}, "
                f"labels {tuple(labels.shape)}",
                "expected images [N,H,W] and labels [N]; download the files again",
            )
        splits.append(Uint8Images(images, labels, mean, std, classes))
    return DatasetSplits(train=splits[0], test=splits[1])


def _download(make: Callable[[bool], T], what: str, root: Path, fix: str) -> T:
    """``make(download)`` with ``download=True`` unless offline; any failure becomes a BnnslimError."""
    offline = _offline()
    try:
        if offline:
            return make(False)
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return make(True)
    except BnnslimError:
        raise
    except Exception as exc:
        how = f"not found ({OFFLINE_ENV} is set, so nothing was downloaded)" if offline else "download failed"
        raise BnnslimError(f"{what} under {root}: {how}: {_one_line(exc)}", fix) from exc


def _require_root(root: Path | None, name: str, layout: str) -> Path:
    if root is None:
        raise BnnslimError(f"dataset '{name}' needs --data-root", f"pass --data-root ROOT laid out as {layout}")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise BnnslimError(f"--data-root {root} is a file, not a folder", f"pass a folder ROOT laid out as {layout}")
    return root


def _mnist_like(
    cls_name: str, root: Path, mean: float, std: float, classes: Sequence[str], url: str
) -> DatasetSplits:
    """torchvision's MNIST/FashionMNIST under ``root`` (files read with idx.py when already there)."""
    raw = root / cls_name / "raw"
    local = load_idx_splits(raw, mean, std, classes)
    if local is not None:
        return local

    def make(download: bool) -> DatasetSplits:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        parts = [cls(str(root), train=train, download=download) for train in (True, False)]
        return DatasetSplits(*(Uint8Images(p.data, p.targets, mean, std, p.classes) for p in parts))

    names = ", ".join(f"{s}.gz" for stems in IDX_FILES.values() for s in stems)
    fix = f"put the four IDX files ({names}; gzipped or not) from {url} into {raw}/"
    return _download(make, f"{cls_name} data", root, fix)


def build_fashion_mnist(root: Path | None) -> DatasetSplits:
    """Full Fashion-MNIST: torchvision under ``root``; else Debian's ``dataset-fashion-mnist`` files."""
    debian = DEBIAN_FASHION_MNIST_DIR
    from_debian = functools.partial(
        load_idx_splits, debian, FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_CLASSES
    )
    if root is None:
        splits = from_debian()
        if splits is None:
            raise BnnslimError(
                f"dataset 'fashion-mnist' needs --data-root (it downloads there) and {debian} has no IDX files",
                "pass --data-root DIR, or install the Debian package: apt-get install dataset-fashion-mnist",
            )
        return splits
    root = _require_root(root, "fashion-mnist", "ROOT/FashionMNIST/raw/ (torchvision downloads it there)")
    try:
        return _mnist_like(
            "FashionMNIST", root, FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_CLASSES,
            "https://github.com/zalandoresearch/fashion-mnist",
        )
    except BnnslimError as exc:
        splits = from_debian()
        if splits is None:
            raise BnnslimError(exc.problem, f"{exc.fix}, or apt-get install dataset-fashion-mnist") from exc
        log.warning("%s; using the Debian files in %s instead", exc.problem, debian)
        return splits


def build_mnist(root: Path | None) -> DatasetSplits:
    """MNIST: torchvision under ``root`` (downloads when possible)."""
    root = _require_root(root, "mnist", "ROOT/MNIST/raw/ (torchvision downloads it there)")
    url = "https://ossci-datasets.s3.amazonaws.com/mnist/"
    return _mnist_like("MNIST", root, MNIST_MEAN, MNIST_STD, MNIST_CLASSES, url)


# --- CIFAR-10 -------------------------------------------------------------------------------------


def build_cifar10(root: Path | None) -> DatasetSplits:
    """CIFAR-10: torchvision under ``root``; random crop + flip for training."""
    root = _require_root(root, "cifar10", "ROOT/cifar-10-batches-py/ (torchvision downloads it there)")

    def make(download: bool) -> DatasetSplits:
        import torchvision.datasets as tvd
        import torchvision.transforms as T

        norm = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *norm])
        train = tvd.CIFAR10(str(root), train=True, download=download, transform=train_tf)
        test = tvd.CIFAR10(str(root), train=False, download=download, transform=T.Compose(norm))
        return DatasetSplits(train=train, test=test)

    fix = (
        f"put cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into {root}/ "
        "(or its extracted cifar-10-batches-py/ folder)"
    )
    return _download(make, "CIFAR-10 data", root, fix)


# --- image folders --------------------------------------------------------------------------------


def load_rgb_image(path: str) -> Any:
    """An image file as an RGB PIL image; a file PIL cannot read is an error naming it (never skipped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # not an image, truncated, unreadable
        raise BnnslimError(f"image '{path}' cannot be read ({type(exc).__name__}: {_one_line(exc)})",
                           "remove or replace that file: bnnslim does not skip images (a skipped image would "
                           "silently change the dataset)") from exc


def _image_folder(path: Path, transform: Any, layout: str) -> Any:
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(path), transform=transform, loader=load_rgb_image)
    except (FileNotFoundError, OSError) as exc:
        raise BnnslimError(
            f"{path} is not a usable image folder: {_one_line(exc)}",
            f"expected {layout}, with at least one image in every class sub-folder",
        ) from exc


def _folder_splits(
    root: Path | None, name: str, test_names: Sequence[str], train_tf: Any, test_tf: Any
) -> DatasetSplits:
    """ImageFolder splits ``ROOT/train`` and the first of ``ROOT/<test_names>``; the classes must agree."""
    layout = FOLDER_LAYOUT if len(test_names) > 1 else IMAGENET_LAYOUT
    root = _require_root(root, name, layout)
    if not root.is_dir():
        raise BnnslimError(f"--data-root {root} does not exist", f"create it laid out as {layout}")
    if not (root / "train").is_dir():
        raise BnnslimError(f"{root} has no train/ folder", f"expected {layout}")
    test_dir = next((root / t for t in test_names if (root / t).is_dir()), None)
    if test_dir is None:
        wanted = " or ".join(f"{t}/" for t in test_names)
        raise BnnslimError(f"{root} has no {wanted} folder", f"expected {layout}")
    train, test = _image_folder(root / "train", train_tf, layout), _image_folder(test_dir, test_tf, layout)
    if train.classes != test.classes:
        only = sorted(set(train.classes) ^ set(test.classes))[:5]
        raise BnnslimError(
            f"{root / 'train'} and {test_dir} have different class folders (e.g. {', '.join(only) or 'order'})",
            "give both splits the same class sub-folders",
        )
    return DatasetSplits(train=train, test=test)


def _eval_transform() -> Any:
    import torchvision.transforms as T

    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_imagenet(root: Path | None) -> DatasetSplits:
    """ImageNet (ILSVRC-2012) as ImageFolders ``ROOT/train`` and ``ROOT/val`` with 1000 classes each."""
    import torchvision.transforms as T

    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *norm])
    splits = _folder_splits(root, "imagenet", ("val",), train_tf, _eval_transform())
    assert root is not None  # _folder_splits raised otherwise
    found = len(splits.train.classes)  # type: ignore[attr-defined]
    if found != IMAGENET_NUM_CLASSES:
        raise BnnslimError(
            f"found {found} class folders in {Path(root) / 'train'}, ImageNet has {IMAGENET_NUM_CLASSES}",
            "use --data folder for a subset or another image collection (val/ must be sorted into class folders)",
        )
    return splits


def build_folder(root: Path | None) -> DatasetSplits:
    """Any ImageFolder collection at 3x224x224 (see :func:`build_folder_at`)."""
    return build_folder_at(root, (3, 224, 224))


def build_folder_at(root: Path | None, shape: tuple[int, int, int]) -> DatasetSplits:
    """Any ImageFolder collection at ``shape`` = (C, H, W), C 1 (grey) or 3 (RGB).

    Images are resized so that the shorter side is H / 0.875 (256 for 224, as
    for ImageNet) and centre-cropped to H x W; training adds a random flip. The
    number of classes is that of the class folders found; the datasets expose
    ``.classes``.
    """
    import torchvision.transforms as T

    c, h, w = shape
    if c not in (1, 3):
        raise BnnslimError(f"--data folder gives 1- or 3-channel images, the model takes {c} channels",
                           "use a model with 1 or 3 input channels, or a dataset plugin for this data")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ((0.449,), (0.226,))
    grey = [T.Grayscale(1)] if c == 1 else []
    size = [T.Resize(round(min(h, w) / 0.875)), T.CenterCrop((h, w))]
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose([*grey, *size, T.RandomHorizontalFlip(), *norm])
    return _folder_splits(root, "folder", ("val", "test"), train_tf, T.Compose([*grey, *size, *norm]))
