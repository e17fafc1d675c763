"""The run directory: manifest round trip, weights, and rebuilding the run's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bnnslim._version import __version__
from bnnslim.binary.layers import BinaryConv2d
from bnnslim.errors import BnnslimError
from bnnslim.run_model import load_run_model
from bnnslim.rundir import RunDir, load_state, load_tensors, save_weights
from bnnslim.stages.binarize import BinarizeOptions, binarize


def test_manifest_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert not run.exists()
    content = {"model": {"source": "/x/net.py", "name": "build_model", "sha256": "ab" * 32},
               "input_shape": [1, 28, 28], "scheme": "xnor",
               "layers": {"binary": ["1.0"], "real": {"0.0": "first layer"}},
               "dataset": None, "binarize": {"trained": False, "history": [{"epoch": 1, "test_accuracy": 0.5}]}}
    run.write_manifest(content)
    assert run.exists()
    back = run.read_manifest()
    signature = back.pop("model_signature")
    assert back == {"format": "bnnslim-run", "format_version": 1, **content, "bnnslim_version": __version__}
    assert len(signature) == 64  # this account's signature of the model entry (bnnslim.trust)
    assert not list(run.path.glob(".*.tmp"))  # no temporary file left behind


def test_update_manifest_replaces_sections_only(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_manifest({"scheme": "xnor", "prune": {"ratio": 0.5}})
    run.update_manifest(prune={"ratio": 0.25})
    m = run.read_manifest()
    assert m["scheme"] == "xnor" and m["prune"] == {"ratio": 0.25}


def test_read_manifest_errors(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(BnnslimError, match="no bnnslim run in .*bnnslim binarize"):
        run.read_manifest()
    run.manifest_path.write_text("{not json")
    with pytest.raises(BnnslimError, match="is not valid JSON"):
        run.read_manifest()
    run.manifest_path.write_text(json.dumps({"name": "some other tool"}))
    with pytest.raises(BnnslimError, match="is not a bnnslim manifest"):
        run.read_manifest()


def test_weights_round_trip_as_safetensors(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    model[1].running_mean.fill_(0.5)
    save_weights(tmp_path / "w.safetensors", model, kind="test")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:  # a safetensors file, not a pickle
        assert f.metadata()["kind"] == "test"
    other = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    load_state(other, load_tensors(tmp_path / "w.safetensors"), tmp_path / "w.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_load_state_names_the_mismatch(tmp_path: Path) -> None:
    tensors = nn.Conv2d(1, 2, 3).state_dict()
    with pytest.raises(BnnslimError, match=r"shape of weight is \(2, 1, 3, 3\), the model has \(4, 1, 3, 3\)"):
        load_state(nn.Conv2d(1, 4, 3), dict(tensors), tmp_path / "w")
    with pytest.raises(BnnslimError, match=r"do not fit the model: missing \['1.weight'"):
        load_state(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 1)),
                   {f"0.{k}": v for k, v in tensors.items()}, tmp_path / "w")


def test_load_tensors_damaged_or_missing(tmp_path: Path) -> None:
    with pytest.raises(BnnslimError, match="not found"):
        load_tensors(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_weights(bad, nn.Linear(3, 3), kind="test")
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(BnnslimError, match="not a readable safetensors file"):
        load_tensors(bad)


@pytest.fixture
def converted(toy_model_file: Path, tmp_path: Path):
    return binarize(BinarizeOptions(model=str(toy_model_file), run=tmp_path / "run"))


def test_binarize_writes_manifest_and_weights(converted, toy_model_file: Path) -> None:
    m = converted.run.read_manifest()
    assert m["model"]["source"] == str(toy_model_file.resolve())
    assert m["model"]["name"] == "build_model"
    assert len(m["model"]["sha256"]) == 64
    assert m["input_shape"] == [1, 8, 8]  # INPUT_SHAPE from the file
    assert m["scheme"] == "xnor"
    assert m["layers"]["binary"] == ["3"]
    assert m["layers"]["real"] == {"0": "first layer", "6": "last layer"}
    assert m["dataset"] is None and m["binarize"]["trained"] is False
    assert m["bnnslim_version"] == __version__
    assert converted.run.binary_weights.is_file()


def test_load_run_model_rebuilds_the_same_model(converted) -> None:
    with torch.no_grad():  # weights that no fresh build could have
        for p in converted.model.parameters():
            p.add_(0.25)
    save_weights(converted.run.binary_weights, converted.model, kind="binary-latent")
    with pytest.raises(BnnslimError, match="does not belong to run"):  # not the weights the manifest recorded
        load_run_model(converted.run)
    converted.run.write_manifest(converted.run.read_manifest())  # as binarize does after saving them
    loaded = load_run_model(converted.run)
    assert isinstance(loaded.model.get_submodule("3"), BinaryConv2d)
    assert not isinstance(loaded.model.get_submodule("0"), BinaryConv2d)
    assert loaded.model.get_submodule("3").scheme.name == "xnor"
    assert loaded.input_shape == (1, 8, 8)
    x = loaded.example(4)
    assert x.shape == (4, 1, 8, 8)
    converted.model.eval()
    loaded.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), converted.model(x))


def test_load_run_model_with_changed_model_file(converted, toy_model_file: Path) -> None:
    toy_model_file.write_text(toy_model_file.read_text().replace("8, 8, 3", "8, 16, 3"))
    with pytest.raises(BnnslimError, match="changed since the run directory was made.*--run DIR"):
        load_run_model(converted.run)


def test_load_run_model_with_deleted_model_file(converted, toy_model_file: Path) -> None:
    toy_model_file.unlink()
    with pytest.raises(BnnslimError, match="model file .* no longer exists"):
        load_run_model(converted.run)


def test_load_run_model_with_foreign_weights(converted, tmp_path: Path) -> None:
    save_weights(tmp_path / "other.safetensors", nn.Linear(2, 2), kind="test")
    with pytest.raises(BnnslimError, match="do not fit the model"):
        load_run_model(converted.run, tmp_path / "other.safetensors")
