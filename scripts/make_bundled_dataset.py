"""Build bnnslim's bundled dataset ``fashion-mnist-mini`` from Debian's Fashion-MNIST files.

Source: the Debian package ``dataset-fashion-mnist`` (``apt-get install -y
dataset-fashion-mnist``), whose gzipped IDX files are in
``/usr/share/datasets/fashion-mnist/``. The script takes a class-balanced subset
(600 train images per class from the official train split, 100 test images per
class from the official test split) and writes it as gzipped safetensors, with
the provenance (package version, file hashes, selection rule, licence) in the
safetensors metadata.

Selection rule, reproducible without any random number generator: within each
split and class, rank the image indices ``i`` by ``sha256(f"{seed}:{split}:{i}")``
and keep the first K; the kept indices are stored in ascending order (so the
classes stay interleaved as in the original files) and saved too, as
``train_source_indices`` / ``test_source_indices``.

Run from the repository root::

    python scripts/make_bundled_dataset.py
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from bnnslim.data.idx import read_idx  # noqa: E402

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = REPO / "bnnslim" / "data" / "fashion_mnist_mini.safetensors.gz"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
NUM_CLASSES = 10


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def debian_version(package: str) -> str:
    """The installed version of a Debian package, or ``unknown``."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def select(labels: torch.Tensor, per_class: int, seed: int, split: str) -> torch.Tensor:
    """Indices of ``per_class`` images of every class, chosen by the sha256 ranking rule."""
    chosen: list[int] = []
    for c in range(NUM_CLASSES):
        members = torch.nonzero(labels == c).flatten().tolist()
        if len(members) < per_class:
            raise SystemExit(f"class {c} of the {split} split has {len(members)} images, fewer than {per_class}")
        members.sort(key=lambda i: hashlib.sha256(f"{seed}:{split}:{i}".encode()).digest())
        chosen.extend(members[:per_class])
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def build(source: Path, per_class_train: int, per_class_test: int, seed: int) -> tuple[dict, dict[str, str]]:
    """The tensors and the metadata of the bundled file."""
    missing = [name for name in FILES.values() if not (source / name).is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)} in {source}: apt-get install -y {DEBIAN_PACKAGE}")
    tensors: dict[str, torch.Tensor] = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        images = read_idx(source / FILES[f"{split}_images"])
        labels = read_idx(source / FILES[f"{split}_labels"])
        keep = select(labels, per_class, seed, split)
        tensors[f"{split}_images"] = images[keep].contiguous()
        tensors[f"{split}_labels"] = labels[keep].contiguous()
        tensors[f"{split}_source_indices"] = keep.to(torch.int32)
    version = debian_version(DEBIAN_PACKAGE)
    meta = {
        "name": "fashion-mnist-mini",
        "description": "class-balanced subset of Fashion-MNIST: "
        f"{per_class_train}/class from the official train split, {per_class_test}/class from the official test split",
        "source": f"Debian package {DEBIAN_PACKAGE} {version}, files in {source}",
        "source_debian_package": DEBIAN_PACKAGE,
        "source_debian_version": version,
        "selection_seed": str(seed),
        "selection_rule": "per split and class, sort image indices i by sha256(f'{seed}:{split}:{i}') and keep "
        f"the first K (train K={per_class_train}, test K={per_class_test}); kept indices in ascending order, "
        "stored as *_source_indices",
        "classes": "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot",
        "license": "MIT",
        "copyright": "Copyright (c) 2017 Zalando SE, https://tech.zalando.com",
        "url": "https://github.com/zalandoresearch/fashion-mnist",
        "made_by": "scripts/make_bundled_dataset.py",
    }
    for name in FILES.values():
        meta[f"sha256:{name}"] = sha256_file(source / name)
    return tensors, meta


def canonical(blob: bytes) -> bytes:
    """The safetensors ``blob`` with its JSON header keys sorted, so that rebuilds are byte-identical.

    safetensors writes the metadata in hash-map order; the data offsets are relative
    to the end of the header, so re-serialising the header at the same length
    (padded with spaces, as the format allows) leaves the tensors untouched.
    """
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > n:
        raise SystemExit("canonical safetensors header is longer than the original")
    return blob[:8] + text.ljust(n, b" ") + blob[8 + n :]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the four gzipped IDX files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--per-class-train", type=int, default=600)
    parser.add_argument("--per-class-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tensors, meta = build(args.source, args.per_class_train, args.per_class_test, args.seed)
    blob = gzip.compress(canonical(save(tensors, metadata=meta)), compresslevel=9, mtime=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(args.out)
    counts = {k: tuple(v.shape) for k, v in tensors.items()}
    print(f"wrote {args.out} ({len(blob) / 1e6:.2f} MB): {counts}")


if __name__ == "__main__":
    main()
