"""Slimming and export: slim == masked, files, reload without pickle, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import bnnslim
from bnnslim.cli.app import app
from bnnslim.errors import BnnslimError
from bnnslim.model_file import read_header
from bnnslim.packing import pack_signs, unpack_signs
from bnnslim.plugin_types import DatasetSpec, DatasetSplits
from bnnslim.plugins import get_plugin_manager
from bnnslim.stages.binarize import BinarizeOptions, binarize
from bnnslim.stages.export import export
from bnnslim.stages.prune import PruneOptions, prune
from bnnslim.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = ["small_cnn.py", "nin.py", "vgg11.py", "resnet18.py"]
QUICK = {"select_steps": 2, "retrain_steps": 2, "batch_size": 32, "heldout": 64}
TRAIN = TrainConfig(epochs=1, steps_per_epoch=3, batch_size=32)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def pruned_run(root: Path, spec: str, data: str = "fashion-mnist-mini", keep: float = 0.6) -> Path:
    run = root / "run"
    binarize(BinarizeOptions(model=spec, run=run, data=data, train=TRAIN))
    prune(run, PruneOptions(keep=keep, strategy="random", **QUICK))
    return run


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pruned_run(tmp_path_factory.mktemp("small"), str(REPO / "examples/small_cnn.py:tiny"))


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def slim_outputs_equal_loaded(result, example: torch.Tensor) -> None:
    plain = bnnslim.load(result.files["plain"])
    packed = bnnslim.load(result.files["packed"])
    with torch.no_grad():
        a, b = plain(example), packed(example)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("example", EXAMPLES)
def test_whole_chain_on_every_example_through_the_cli(tmp_path: Path, example: str) -> None:
    run = tmp_path / "run"
    spec = f"{REPO / 'examples' / example}:tiny"
    steps = ["--select-steps", "2", "--retrain-steps", "2", "--batch-size", "32"]
    assert cli("binarize", spec, "--run", str(run), "--data", "fashion-mnist-mini", "--epochs", "1",
               "--steps-per-epoch", "2", "--batch-size", "32").exit_code == 0
    assert cli("prune", "--run", str(run), "--keep", "0.5", "--strategy", "l1", *steps).exit_code == 0
    result = cli("export", "--run", str(run), "--no-evaluate")
    assert result.exit_code == 0, result.output
    assert "slim == masked" in result.output
    manifest = json.loads((run / "manifest.json").read_text())
    plain = bnnslim.load(run / "model.safetensors")
    packed = bnnslim.load(run / "model.bnn.safetensors")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), packed(x), rtol=1e-5, atol=1e-5)
    kept = sum(v["after"] for v in manifest["prune"]["layers"].values())
    convs = {n: m for n, m in plain.named_modules() if n in manifest["prune"]["layers"]}
    assert sum(m.out_channels for m in convs.values()) == kept == manifest["prune"]["filters_kept"]


def test_export_reports_sizes_on_disk_and_accuracy(small_run: Path, tmp_path: Path) -> None:
    run = copy_run(small_run, tmp_path)
    result = export(run)
    report = json.loads((run / "export-report.json").read_text())
    for form in ("plain", "packed"):
        assert report["sizes_bytes"][form] == result.files[form].stat().st_size
    assert report["sizes_bytes"]["fp32 original"] == (run / "binary.safetensors").stat().st_size
    assert report["sizes_bytes"]["packed"] < report["sizes_bytes"]["plain"] < report["sizes_bytes"]["fp32 original"]
    assert 0.0 <= result.accuracy <= 1.0
    assert (run / "kept-filters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.max_difference < 1e-4
    slim_outputs_equal_loaded(result, torch.randn(2, 1, 28, 28))


def test_packed_signs_round_trip_bit_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    for cin in (1, 7, 8, 9, 64, 100):
        signs = torch.where(torch.rand(5, cin, 3, 3, generator=g) < 0.5, -1.0, 1.0)
        packed = pack_signs(signs)
        assert packed.dtype == torch.uint8 and packed.shape == (5, 3, 3, (cin + 7) // 8)
        assert torch.equal(unpack_signs(packed, cin), signs)


def test_packed_file_holds_one_bit_per_binary_weight(small_run: Path, tmp_path: Path) -> None:
    run = copy_run(small_run, tmp_path)
    result = export(run, ("packed",), evaluate_data=False)
    tensors = load_file(str(result.files["packed"]))
    plain = bnnslim.load(export(run, ("plain",), evaluate_data=False).files["plain"])
    binary = json.loads(read_header(result.files["packed"])["binary_layers"])
    for name in binary:
        bits = tensors[f"{name}.weight_bits"]
        conv = dict(plain.named_modules())[name]
        assert bits.dtype == torch.uint8
        assert bits.numel() == (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
                                * ((conv.in_channels + 7) // 8))
        assert torch.equal(unpack_signs(bits, conv.in_channels), conv.scheme.binarize_weight(conv.weight.detach()))
        assert f"{name}.weight" not in tensors


def test_export_without_pruning_writes_the_unslimmed_binary_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    binarize(BinarizeOptions(model=str(REPO / "examples/small_cnn.py:tiny"), run=run))
    result = cli("export", "--run", str(run))
    assert result.exit_code == 0, result.output
    assert "not pruned" in result.output
    model = bnnslim.load(run / "model.safetensors")
    assert model[1][0].out_channels == 16


def test_output_option_writes_one_file_atomically(small_run: Path, tmp_path: Path) -> None:
    run = copy_run(small_run, tmp_path)
    out = tmp_path / "deploy" / "m.bnn.safetensors"
    result = cli("export", "--run", str(run), "--format", "packed", "-o", str(out), "--no-evaluate")
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    info = cli("info", str(out))
    assert info.exit_code == 0 and "packed" in info.output and "weight_bits" in info.output


def bad(result, message: str) -> None:
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output


def test_truncated_corrupted_and_foreign_files_are_refused(small_run: Path, tmp_path: Path) -> None:
    run = copy_run(small_run, tmp_path)
    good = export(run, ("plain",), evaluate_data=False).files["plain"]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    for path, message in [(truncated, "truncated or corrupted"), (garbage, "truncated or corrupted"),
                          (foreign, "not a bnnslim model")]:
        with pytest.raises(BnnslimError, match=message):
            bnnslim.load(path)
        bad(cli("info", str(path)), message)


def test_changed_model_file_is_refused_on_load(tmp_path: Path) -> None:
    src = tmp_path / "net.py"
    src.write_text((REPO / "examples/small_cnn.py").read_text())
    run = pruned_run(tmp_path, f"{src}:tiny")
    path = export(run, ("plain",), evaluate_data=False).files["plain"]
    src.write_text(src.read_text() + "\n# edited\n")
    with pytest.raises(BnnslimError, match="changed"):
        bnnslim.load(path)


def test_unwritable_output_leaves_nothing_behind(small_run: Path, tmp_path: Path) -> None:
    run = copy_run(small_run, tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = cli("export", "--run", str(run), "-f", "plain", "-o", str(blocker / "m.safetensors"), "--no-evaluate")
    bad(result, "cannot write")
    assert not (run / "model.safetensors").exists()


def test_slim_mismatch_is_reported_with_the_layer_and_nothing_written(small_run: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run = copy_run(small_run, tmp_path)
    import bnnslim.prune.slim as ex

    real_slim = ex.slim

    def broken_slim(model, groups, masks, example):  # removes the wrong channels
        flipped = {k: 1 - v if 0 < v.sum() < v.numel() else v for k, v in masks.items()}
        return real_slim(model, groups, flipped, example)

    monkeypatch.setattr(ex, "slim", broken_slim)
    result = cli("export", "--run", str(run), "--no-evaluate")
    bad(result, "differs from the masked model")
    assert "first at layer" in result.output
    assert not (run / "model.safetensors").exists() and not (run / "model.bnn.safetensors").exists()


# -- torchvision models, the whole chain with random 3x32x32 data -------------------------------------

class NoiseData:
    """A test plugin: a seeded random 3x32x32 dataset, so that torchvision models run the chain fast."""

    @staticmethod
    def bnnslim_datasets():
        from torch.utils.data import TensorDataset

        def build(root):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(64, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (64,), generator=g)
            return DatasetSplits(train=TensorDataset(x, y), test=TensorDataset(x[:32], y[:32]))

        yield DatasetSpec(name="noise32", description="random", input_shape=(3, 32, 32), num_classes=10, build=build)


@pytest.fixture
def noise_plugin():
    from bnnslim.hookspecs import hookimpl

    plugin = NoiseData()
    plugin.bnnslim_datasets = hookimpl(NoiseData.bnnslim_datasets)  # type: ignore[method-assign]
    pm = get_plugin_manager()
    pm.register(plugin, name="test-noise")
    yield
    pm.unregister(name="test-noise")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg11_bn", "densenet121", "mobilenet_v2", "googlenet",
                                  "mnasnet0_5"])  # MNASNet: its state needs the version metadata
def test_whole_chain_on_torchvision_models(tmp_path: Path, noise_plugin, name: str) -> None:
    src = tmp_path / f"{name}.py"
    extra = ", aux_logits=False, init_weights=False" if name == "googlenet" else ""
    src.write_text(f"import torchvision\n\ndef build_model(num_classes=10):\n"
                   f"    return torchvision.models.{name}(num_classes=num_classes{extra})\n")
    run = tmp_path / "run"
    binarize(BinarizeOptions(model=str(src), run=run, data="noise32",
                             train=TrainConfig(epochs=1, steps_per_epoch=1, batch_size=16)))
    pr = prune(run, PruneOptions(keep=0.7, strategy="random", select_steps=0, retrain_steps=1, batch_size=16,
                                 heldout=16))
    assert pr.kept_filters == pr.requested_filters
    result = export(run, evaluate_data=False)
    assert result.max_difference < 1e-4
    slim_outputs_equal_loaded(result, torch.randn(2, 3, 32, 32))


def test_a_model_torch_pruning_cannot_trace_gets_a_clear_error_naming_the_layer(tmp_path: Path) -> None:
    """torchvision's shufflenet_v2: torch-pruning 1.6 fails on its channel shuffle (view/transpose/view)."""
    src = tmp_path / "shuffle.py"
    src.write_text("import torchvision\n\ndef build_model(num_classes=10):\n"
                   "    return torchvision.models.shufflenet_v2_x0_5(num_classes=num_classes)\n")
    result = cli("binarize", str(src), "--run", str(tmp_path / "run"), "--input-shape", "3,32,32")
    bad(result, "cannot trace the channel dependencies")
    assert "stage2.0.branch2" in result.output and "channel shuffle" in result.output
    assert not (tmp_path / "run").exists()


def test_onnx_export_computes_what_the_slim_model_computes(small_run: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    run = copy_run(small_run, tmp_path)
    result = cli("export", "--run", str(run), "-f", "onnx", "-o", str(tmp_path / "m.onnx"), "--no-evaluate")
    assert result.exit_code == 0, result.output
    slim_model = bnnslim.load(export(run, ("plain",), evaluate_data=False).files["plain"])
    x = torch.randn(3, 1, 28, 28)
    got = ReferenceEvaluator(onnx.load(str(tmp_path / "m.onnx"))).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), slim_model(x), rtol=1e-4, atol=1e-4)


def test_a_file_from_another_format_version_is_refused(small_run: Path, tmp_path: Path) -> None:
    run = copy_run(small_run, tmp_path)
    good = export(run, ("packed",), evaluate_data=False).files["packed"]
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict (no iteration)
    meta.update(format_version="99", bnnslim_version="9.0.0")
    future = tmp_path / "future.bnn.safetensors"
    save_file(tensors, str(future), metadata=meta)
    with pytest.raises(BnnslimError, match="written by bnnslim 9.0.0 in file format 99"):
        bnnslim.load(future, runtime="packed")
    bad(cli("info", str(future)), "file format 99")
