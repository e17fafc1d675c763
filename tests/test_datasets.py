"""Datasets: the bundled subset, the IDX reader, the built-in builders and their errors.

No test touches the network: an autouse fixture makes every socket connection
fail at once, so torchvision's downloads fail fast and the builders' error paths run.
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import struct
from pathlib import Path

import pytest
import torch

from bnnslim.data import builtin
from bnnslim.data.idx import parse_idx, read_idx
from bnnslim.errors import BnnslimError
from bnnslim.plugins import get_dataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv(builtin.OFFLINE_ENV, raising=False)


def idx_bytes(array: torch.Tensor) -> bytes:
    """An IDX file of a uint8 tensor, written by hand (independent of the reader)."""
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(struct.pack(">i", d) for d in array.shape)
    return header + array.contiguous().numpy().tobytes()


def png_bytes(seed: int) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path, splits: dict[str, list[str]], per_class: int = 2) -> None:
    """ImageFolder layout ``root/<split>/<class>/<i>.png`` of tiny 8x8 RGB images."""
    for split, classes in splits.items():
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (root / split / name / f"{i}.png").write_bytes(png_bytes(c * 100 + i))


# --- the bundled subset ---------------------------------------------------------------------------


def test_bundled_subset_shapes_balance_and_normalisation() -> None:
    spec = get_dataset("fashion-mnist-mini")
    assert not spec.needs_root and spec.input_shape == (1, 28, 28) and spec.num_classes == 10
    splits = spec.build(None)
    for ds, n in ((splits.train, 6000), (splits.test, 1000)):
        x, y = ds.tensors
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), n // 10))
        pixels = x * builtin.FASHION_MNIST_STD + builtin.FASHION_MNIST_MEAN
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
        assert torch.allclose(pixels * 255, (pixels * 255).round(), atol=1e-3)
    x = splits.train.tensors[0]
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    image, label = splits.train[0]
    assert image.shape == spec.input_shape and 0 <= int(label) < 10
    assert splits.train.classes[0] == "T-shirt/top"


def test_bundled_subset_records_its_source() -> None:
    meta = builtin.bundled_metadata()
    assert meta["license"] == "MIT" and "Zalando SE" in meta["copyright"]
    assert meta["source_debian_package"] == "dataset-fashion-mnist"
    assert "github.com/zalandoresearch/fashion-mnist" in meta["url"]
    assert len(meta["sha256:train-images-idx3-ubyte.gz"]) == 64
    assert "selection_rule" in meta and "selection_seed" in meta


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_bundled_subset_matches_the_debian_files() -> None:
    t = builtin.bundled_tensors()
    labels = read_idx(DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz")
    images = read_idx(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")
    keep = t["test_source_indices"].long()
    assert torch.equal(t["test_images"], images[keep]) and torch.equal(t["test_labels"], labels[keep])


# --- IDX reader -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gzipped", [False, True])
def test_idx_round_trip(tmp_path: Path, gzipped: bool) -> None:
    array = torch.randint(0, 256, (5, 3, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    data = idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if gzipped else "a.idx")
    path.write_bytes(gzip.compress(data) if gzipped else data)
    out = read_idx(path)
    assert out.dtype == torch.uint8 and torch.equal(out, array)


def test_idx_rejects_truncated_and_garbled_files(tmp_path: Path) -> None:
    data = idx_bytes(torch.zeros(4, 6, 6, dtype=torch.uint8))
    path = tmp_path / "short.idx"
    path.write_bytes(data[:-10])
    with pytest.raises(BnnslimError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    with pytest.raises(BnnslimError, match="gzip"):
        parse_idx(gzip.compress(data)[:-20])
    with pytest.raises(BnnslimError, match="magic"):
        parse_idx(b"\x12\x34" + data[2:])
    with pytest.raises(BnnslimError, match="float32"):
        parse_idx(bytes([0, 0, 0x0D, 1]) + struct.pack(">i", 1) + b"\0" * 4)
    with pytest.raises(BnnslimError, match="cannot read"):
        read_idx(tmp_path / "absent.idx")


# --- image folders --------------------------------------------------------------------------------


@pytest.mark.parametrize("test_split", ["val", "test"])
def test_folder_builder(tmp_path: Path, test_split: str) -> None:
    write_folder(tmp_path, {"train": ["ant", "bee", "cat"], test_split: ["ant", "bee", "cat"]})
    spec = get_dataset("folder")
    assert spec.needs_root and spec.num_classes == 0
    splits = spec.build(tmp_path)
    assert splits.train.classes == ["ant", "bee", "cat"] and len(splits.train) == 6 and len(splits.test) == 6
    image, label = splits.test[5]
    assert image.shape == spec.input_shape == (3, 224, 224) and image.dtype == torch.float32
    assert label == 2


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 48)])
def test_folder_resizes_to_the_model_input_shape(tmp_path: Path, shape: tuple[int, int, int]) -> None:
    write_folder(tmp_path, {"train": ["ant", "bee"], "val": ["ant", "bee"]})
    splits = get_dataset("folder").splits_for(tmp_path, shape)
    assert splits.train[0][0].shape == splits.test[3][0].shape == shape
    with pytest.raises(BnnslimError, match="1- or 3-channel"):
        get_dataset("folder").splits_for(tmp_path, (4, 16, 16))
    # a dataset of fixed-size images ignores the shape (the binarize check then compares it with the model's)
    assert get_dataset("fashion-mnist-mini").splits_for(None, shape).train[0][0].shape == (1, 28, 28)


FOLDER_NET = """
from torch import nn
INPUT_SHAPE = (3, 24, 24)

def build_model(num_classes=10, in_channels=3):
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(),
        nn.Conv2d(8, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
"""


def test_folder_data_trains_and_prunes_at_the_models_own_input_shape(tmp_path: Path) -> None:
    """A 3x24x24 model on --data folder: binarize, prune and export read the images at 24x24, not 224x224."""
    from bnnslim.stages.binarize import BinarizeOptions, binarize
    from bnnslim.stages.prune import PruneOptions, prune
    from bnnslim.train import TrainConfig

    write_folder(tmp_path / "data", {"train": ["ant", "bee"], "val": ["ant", "bee"]}, per_class=4)
    (tmp_path / "net.py").write_text(FOLDER_NET)
    run = tmp_path / "run"
    result = binarize(BinarizeOptions(model=str(tmp_path / "net.py"), run=run, data="folder",
                                      data_root=tmp_path / "data", train=TrainConfig(epochs=1, batch_size=4)))
    assert result.test_accuracy is not None
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["input_shape"] == [3, 24, 24] and manifest["model"]["num_classes"] == 2
    pruned = prune(run, PruneOptions(keep=0.5, strategy="bn", retrain_steps=1, finetune_steps=1, batch_size=4,
                                     heldout=2))
    assert pruned.kept_filters == 4


def test_imagenet_builder_with_1000_classes(tmp_path: Path) -> None:
    png = png_bytes(0)
    for split in ("train", "val"):
        for c in range(1000):
            folder = tmp_path / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            (folder / "0.png").write_bytes(png)
    spec = get_dataset("imagenet")
    torch.manual_seed(0)
    splits = spec.build(tmp_path)
    assert len(splits.train.classes) == spec.num_classes == 1000
    image, label = splits.train[999]
    assert image.shape == spec.input_shape == (3, 224, 224) and label == 999
    assert splits.test[0][0].shape == (3, 224, 224)


def test_imagenet_builder_rejects_a_wrong_class_count(tmp_path: Path) -> None:
    write_folder(tmp_path, {"train": ["a", "b"], "val": ["a", "b"]}, per_class=1)
    with pytest.raises(BnnslimError, match="found 2 class folders.*1000"):
        get_dataset("imagenet").build(tmp_path)


@pytest.mark.parametrize("name", ["folder", "imagenet"])
def test_image_folder_layout_errors(tmp_path: Path, name: str) -> None:
    build = get_dataset(name).build
    with pytest.raises(BnnslimError, match="needs --data-root"):
        build(None)
    missing = tmp_path / "nowhere"
    with pytest.raises(BnnslimError, match="does not exist") as info:
        build(missing)
    assert str(missing) in str(info.value) and "train/<class>" in str(info.value)
    write_folder(tmp_path, {"val": ["a"]}, per_class=1)
    with pytest.raises(BnnslimError, match="no train/ folder") as info:
        build(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_folder_errors_on_missing_val_mismatched_classes_and_empty_train(tmp_path: Path) -> None:
    build = get_dataset("folder").build
    write_folder(tmp_path, {"train": ["a", "b"]}, per_class=1)
    with pytest.raises(BnnslimError, match="no val/ or test/ folder"):
        build(tmp_path)
    write_folder(tmp_path, {"val": ["a", "c"]}, per_class=1)
    with pytest.raises(BnnslimError, match="different class folders.*b, c"):
        build(tmp_path)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(BnnslimError, match="not a usable image folder"):
        build(empty)


# --- torchvision datasets without a network -------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_download_datasets_without_root_or_network(tmp_path: Path, name: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_dataset(name)
    assert spec.needs_root
    with pytest.raises(BnnslimError, match="needs --data-root"):
        spec.build(None)
    root = tmp_path / "data"
    with pytest.raises(BnnslimError, match="download failed") as info:
        spec.build(root)
    assert str(root) in str(info.value) and "put " in str(info.value)
    monkeypatch.setenv(builtin.OFFLINE_ENV, "1")
    with pytest.raises(BnnslimError, match=builtin.OFFLINE_ENV):
        spec.build(root)


def test_mnist_reads_idx_files_already_under_root(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 20), ("test", 10)):
        images_stem, labels_stem = builtin.IDX_FILES[split]
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        (raw / f"{images_stem}.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (raw / labels_stem).write_bytes(idx_bytes(torch.arange(n, dtype=torch.uint8) % 10))
    splits = get_dataset("mnist").build(tmp_path)
    assert len(splits.train) == 20 and len(splits.test) == 10
    image, label = splits.test[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 3
    expected = (images[3].float() / 255 - builtin.MNIST_MEAN) / builtin.MNIST_STD
    assert torch.allclose(image[0], expected)


def test_fashion_mnist_without_debian_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    build = get_dataset("fashion-mnist").build
    with pytest.raises(BnnslimError, match="needs --data-root.*apt-get install dataset-fashion-mnist"):
        build(None)
    with pytest.raises(BnnslimError, match="download failed.*FashionMNIST/raw.*apt-get install"):
        build(tmp_path / "root")


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_falls_back_to_the_debian_files(tmp_path: Path) -> None:
    splits = get_dataset("fashion-mnist").build(tmp_path / "root")  # download fails: no network
    assert len(splits.train) == 60000 and len(splits.test) == 10000
    image, label = splits.train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 9
    assert torch.equal(torch.bincount(splits.test.labels), torch.full((10,), 1000))
    assert splits.train.classes[9] == "Ankle boot"


def test_unknown_dataset_lists_the_known_names() -> None:
    with pytest.raises(BnnslimError) as info:
        get_dataset("nope")
    message = str(info.value)
    assert "unknown dataset 'nope'" in message
    for name in ("fashion-mnist-mini", "fashion-mnist", "mnist", "cifar10", "imagenet", "folder"):
        assert name in message


def test_unreadable_image_is_named_not_skipped(tmp_path: Path) -> None:
    write_folder(tmp_path, {"train": ["a", "b"], "val": ["a", "b"]})
    bad = tmp_path / "train" / "a" / "broken.png"
    bad.write_bytes(b"this is not a png")
    splits = builtin.build_folder(tmp_path)
    index = [p for p, _ in splits.train.samples].index(str(bad))  # type: ignore[attr-defined]
    with pytest.raises(BnnslimError, match=r"image '.*broken.png' cannot be read .*bnnslim does not skip images"):
        splits.train[index]
    truncated = tmp_path / "val" / "b" / "cut.png"
    truncated.write_bytes(png_bytes(3)[:40])
    splits = builtin.build_folder(tmp_path)
    index = [p for p, _ in splits.test.samples].index(str(truncated))  # type: ignore[attr-defined]
    with pytest.raises(BnnslimError, match="cut.png' cannot be read"):
        splits.test[index]
