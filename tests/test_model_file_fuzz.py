"""``bnnslim.load`` raises only BnnslimError for a damaged file.

Random truncations and byte mutations of real exports, and plausible but wrong header fields and tensors.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _helpers import BUNDLED, SMALL_CNN

import bnnslim
from bnnslim.errors import BnnslimError
from bnnslim.stages.binarize import BinarizeOptions, binarize
from bnnslim.stages.export import export
from bnnslim.stages.prune import PruneOptions, prune
from bnnslim.train import TrainConfig

CASES = 60  # per file and kind of damage


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Path]]]:
    """(model file, {form: path}) of a pruned, slimmed small CNN, in a fresh account."""
    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(root / "config"))
        source = root / "net.py"
        source.write_text(SMALL_CNN.read_text())
        run = root / "run"
        binarize(BinarizeOptions(model=f"{source}:tiny", run=run, data=BUNDLED,
                                 train=TrainConfig(epochs=1, steps_per_epoch=2, batch_size=16)))
        prune(run, PruneOptions(keep=0.6, strategy="random", select_steps=1, retrain_steps=1, batch_size=16,
                                heldout=32))
        files = export(run, ("plain", "packed"), evaluate_data=False).files
        yield source, files


def _load_all_ways(path: Path, source: Path) -> None:
    """Load as a stranger would (refused or fine) and with the model named (deepest path); only BnnslimError."""
    for kwargs in ({}, {"model": f"{source}:tiny"}, {"model": f"{source}:tiny", "runtime": "packed"}):
        try:
            model = bnnslim.load(path, **kwargs)
        except BnnslimError:
            continue
        with torch.no_grad():
            model(torch.zeros(1, 1, 28, 28))


def _header_span(data: bytes) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", data[:8])
    return 8, 8 + n


@pytest.mark.parametrize("form", ["plain", "packed"])
def test_truncations(exports, tmp_path: Path, form: str) -> None:
    source, files = exports
    data = files[form].read_bytes()
    rng = random.Random(f"truncate-{form}")
    cuts = sorted({0, 1, 7, 8, 9, len(data) - 1, *(rng.randrange(len(data)) for _ in range(CASES))})
    for cut in cuts:
        damaged = tmp_path / f"cut{cut}.safetensors"
        damaged.write_bytes(data[:cut])
        with pytest.raises(BnnslimError):
            bnnslim.load(damaged, model=f"{source}:tiny")


@pytest.mark.parametrize("form", ["plain", "packed"])
def test_header_byte_mutations(exports, tmp_path: Path, form: str) -> None:
    source, files = exports
    data = bytearray(files[form].read_bytes())
    start, end = _header_span(bytes(data))
    rng = random.Random(f"mutate-{form}")
    damaged = tmp_path / "m.safetensors"
    for _ in range(CASES * 2):
        mutated = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4))):
            mutated[rng.randrange(start, end)] = rng.choice((rng.randrange(256), *b'"{}[]:,0123456789-.e '))
        damaged.write_bytes(bytes(mutated))
        _load_all_ways(damaged, source)


@pytest.mark.parametrize("form", ["plain", "packed"])
def test_header_field_mutations(exports, tmp_path: Path, form: str) -> None:
    """Well-formed JSON with wrong values: every metadata field replaced by something plausible but wrong."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, files = exports
    with safe_open(str(files[form]), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    layers = json.loads(meta["layers"])
    first = next(iter(layers))
    binary = json.loads(meta["binary_layers"])[-1]
    n_in = layers[binary]["in"]
    # another input count in the same number of packed bytes: only running the model shows it is wrong
    same_bytes = n_in - 1 if n_in % 8 != 1 else n_in + 1
    wrong = {
        "model": ["null", "[]", "{}", '"x"', json.dumps({**json.loads(meta["model"]), "num_classes": -1}),
                  json.dumps({**json.loads(meta["model"]), "name": "os.system"})],
        "binary_layers": ["null", '"3"', "[1]", '["nosuch"]', "{}"],
        "layers": ["null", "[]", json.dumps({first: {"in": 1}}),
                   json.dumps({first: {"in": 10**12, "out": 1, "groups": 1}}),
                   json.dumps({**layers, first: {"in": 3, "out": 5, "groups": 2}}),
                   json.dumps({"nosuch": {"features": 3}}), json.dumps({**layers, first: {"features": 0}}),
                   json.dumps({**layers, binary: {**layers[binary], "in": same_bytes}})],
        "input_shape": ["null", "[]", "[0, 28, 28]", "[1, 28, 28, 1, 1]", '["1"]', "[1e400]", "[2, 28, 28]",
                        "[1, 1048576, 1048576]"],
        "metrics": ["null", "[]", "{"],
        "scheme": ["", "nosuch"],
        "form": ["packed" if form == "plain" else "plain", "other"],
        "format_version": ["0", "2"],
    }
    for key, values in wrong.items():
        for value in [*values, None]:
            damaged = tmp_path / "m.safetensors"
            changed = {k: v for k, v in meta.items() if k != key}
            if value is not None:
                changed[key] = value
            save_file(tensors, str(damaged), metadata=changed)
            if key == "metrics" and value is None:  # metrics are optional
                _load_all_ways(damaged, source)
                continue
            with pytest.raises(BnnslimError):
                bnnslim.load(damaged, model=f"{source}:tiny")


def test_tensor_mutations(exports, tmp_path: Path) -> None:
    """Dropped, renamed or reshaped tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, files = exports
    for form in ("plain", "packed"):
        with safe_open(str(files[form]), framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
        for key in sorted(tensors)[:: max(1, len(tensors) // 8)]:
            variants = [
                {k: v for k, v in tensors.items() if k != key},
                {**{k: v for k, v in tensors.items() if k != key}, key + "x": tensors[key]},
                {**tensors, key: torch.zeros(3, 3, dtype=tensors[key].dtype)},
            ]
            for variant in variants:
                damaged = tmp_path / "t.safetensors"
                save_file(variant, str(damaged), metadata=meta)
                with pytest.raises(BnnslimError):
                    bnnslim.load(damaged, model=f"{source}:tiny")
