"""Read IDX files (the MNIST / Fashion-MNIST format), gzipped or not.

Layout: two zero bytes, a type byte (``0x08`` = uint8), the number of dimensions,
then each dimension as a big-endian int32, then the array in C order.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import torch

from bnnslim.errors import BnnslimError

_GZIP_MAGIC = b"\x1f\x8b"
_UINT8 = 0x08
_TYPE_NAMES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}


def _bad(source: str, what: str) -> BnnslimError:
    return BnnslimError(
        f"{source} is not a valid IDX file: {what}",
        "download the file again (e.g. from github.com/zalandoresearch/fashion-mnist) and check its size",
    )


def parse_idx(data: bytes, source: str = "<bytes>") -> torch.Tensor:
    """Decode the bytes of an (uncompressed or gzipped) IDX file into a uint8 tensor."""
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise _bad(source, f"broken gzip stream ({exc})") from exc
    if len(data) < 4:
        raise _bad(source, f"only {len(data)} bytes, no header")
    if data[0] != 0 or data[1] != 0:
        raise _bad(source, f"magic starts with {data[:2].hex()} instead of 0000")
    dtype, ndim = data[2], data[3]
    if dtype != _UINT8:
        kind = _TYPE_NAMES.get(dtype, f"unknown type 0x{dtype:02x}")
        raise _bad(source, f"element type {kind}; only uint8 IDX files are supported")
    if ndim == 0:
        raise _bad(source, "zero dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise _bad(source, f"header needs {header_len} bytes, file has {len(data)}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big", signed=True) for i in range(ndim)]
    if any(d < 0 for d in dims):
        raise _bad(source, f"negative dimension in {dims}")
    count = 1
    for d in dims:
        count *= d
    body = len(data) - header_len
    if body != count:
        state = "truncated" if body < count else "has trailing bytes"
        raise _bad(source, f"{state}: dims {dims} need {count} data bytes, found {body}")
    if count == 0:
        return torch.empty(dims, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data[header_len:]), dtype=torch.uint8).reshape(dims)


def read_idx(path: str | Path) -> torch.Tensor:
    """Read the IDX file at ``path`` (``.gz`` detected from its content) into a uint8 tensor."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BnnslimError(
            f"cannot read IDX file {path}: {exc.strerror or exc}", "check the path and its permissions"
        ) from exc
    return parse_idx(data, str(path))
