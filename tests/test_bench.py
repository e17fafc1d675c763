"""``bnnslim.load(..., runtime="packed")`` and ``bnnslim bench``: same outputs, timings, warnings, bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from _helpers import REPO, assert_clean_error
from safetensors.torch import load_file, save_file
from typer.testing import Result

import bnnslim
from bnnslim.bench import bench
from bnnslim.binary.layers import BinaryConv2d
from bnnslim.errors import BnnslimError
from bnnslim.model_file import read_header
from bnnslim.runtime import PackedBinaryConv2d, build, runtime_plan, with_emulation
from bnnslim.stages.binarize import BinarizeOptions, binarize
from bnnslim.stages.export import export
from bnnslim.stages.prune import PruneOptions, prune
from bnnslim.train import TrainConfig

QUICK = {"repeats": 2, "warmup": 1}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained, pruned (keep 0.5) and exported tiny small_cnn run: plain and packed files."""
    path = tmp_path_factory.mktemp("bench") / "run"
    binarize(BinarizeOptions(model=f"{REPO}/examples/small_cnn.py:tiny", run=path, data="fashion-mnist-mini",
                             train=TrainConfig(epochs=1, steps_per_epoch=2, batch_size=32)))
    prune(path, PruneOptions(keep=0.5, strategy="random", select_steps=1, retrain_steps=1, batch_size=32, heldout=32))
    export(path, evaluate_data=False)
    return path


@pytest.fixture
def fresh_build() -> Iterator[None]:
    build.reset()
    yield
    build.reset()


def inputs(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------- bnnslim.load(runtime=)


@pytest.mark.parametrize("form", ["packed", "plain"])
def test_load_packed_runtime_equals_torch(run: Path, form: str) -> None:
    path = run / ("model.bnn.safetensors" if form == "packed" else "model.safetensors")
    reference = bnnslim.load(path)
    fast = bnnslim.load(path, runtime="packed")
    assert not fast.training
    assert not any(isinstance(m, BinaryConv2d) for m in fast.modules())
    packed = [n for n, m in fast.named_modules() if isinstance(m, PackedBinaryConv2d)]
    assert packed == [n for n, m in reference.named_modules() if isinstance(m, BinaryConv2d)]
    plan = runtime_plan(fast)
    assert not plan.unchanged
    assert set(plan.kernel) | set(plan.emulated) == set(packed)
    x = inputs()
    with torch.no_grad():
        got, want, emulated = fast(x), reference(x), with_emulation(fast)(x)
    assert torch.equal(got, emulated)  # the kernels equal the packed model's torch emulation bit for bit
    # torch's BinaryConv2d sums alpha-scaled terms in float: last-bit differences only, on this trained net
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_load_packed_runtime_uses_the_files_bits_and_alpha(run: Path) -> None:
    path = run / "model.bnn.safetensors"
    stored = load_file(str(path))
    fast = bnnslim.load(path, runtime="packed")
    layers = {n: m for n, m in fast.named_modules() if isinstance(m, PackedBinaryConv2d)}
    assert layers
    for name, layer in layers.items():
        assert torch.equal(layer.weight_bits, stored[f"{name}.weight_bits"])
        assert layer.alpha is not None and torch.equal(layer.alpha, stored[f"{name}.alpha"])


def test_load_unknown_runtime_lists_the_choices(run: Path) -> None:
    with pytest.raises(BnnslimError, match="unknown runtime 'fast'.*torch, packed"):
        bnnslim.load(run / "model.bnn.safetensors", runtime="fast")


def test_load_packed_runtime_from_a_corrupted_file_is_refused(run: Path, tmp_path: Path) -> None:
    tensors = load_file(str(run / "model.bnn.safetensors"))
    meta = read_header(run / "model.bnn.safetensors")
    name = next(k for k in tensors if k.endswith(".weight_bits"))
    tensors[name] = tensors[name][:, :, :, :0].contiguous()  # bits of the wrong shape
    damaged = tmp_path / "damaged.bnn.safetensors"
    save_file(tensors, str(damaged), metadata=meta)
    with pytest.raises(BnnslimError):
        bnnslim.load(damaged, runtime="packed")


# ---------------------------------------------------------------- bench (library)


def test_bench_library_result(run: Path) -> None:
    result = bench(run, batches=[1, 3], threads=[1], **QUICK)
    assert result.file == run / "model.bnn.safetensors" and result.form == "packed"
    assert result.input_shape == [1, 28, 28]
    assert result.matches_emulation
    assert result.max_abs_difference < 1e-3
    assert [(p.batch, p.threads) for p in result.points] == [(1, 1), (3, 1)]
    for p in result.points:
        assert set(p.latency_ms) == {"float", "torch_binary", "packed"}
        assert all(v > 0 for v in p.latency_ms.values())
        assert set(p.speedup) == {"packed_vs_float", "packed_vs_torch_binary", "torch_binary_vs_float"}
        assert all(v > 0 for v in p.speedup.values())
        names = [row.layer for row in p.layers]
        assert names[-1] == "other" and {"0.0", "1.0", "8"} <= set(names)
        binary = [row for row in p.layers if row.kind == "binary conv"]
        assert binary and all(all(v is not None and v > 0 for v in row.ms.values()) for row in binary)
        # the real first conv (computed by the sign packing after it) and the classifier (in the pooled tail)
        # are timed in the packed model too, under their own names, not left in "other"
        real = {row.layer: row for row in p.layers if row.kind in ("conv", "linear")}
        assert {"0.0", "8"} <= set(real) and all(v is not None and v > 0 for v in real["0.0"].ms.values())
        assert all(v is not None and v > 0 for v in real["8"].ms.values())
    assert torch.get_num_threads() == 1  # bench leaves torch's thread count as it found it


def test_bench_warns_without_fast_popcount(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnnslim.runtime

    monkeypatch.setattr(bnnslim.runtime, "kernel_status", lambda: build.KernelStatus(True, "popcnt"))
    result = bench(run, **QUICK, layers=False)
    assert not result.fast_popcount
    assert any("no vector popcount" in w for w in result.warnings), result.warnings


def test_bench_warns_when_the_runtime_falls_back(run: Path, fresh_build: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(build.ENV_FALLBACK, "1")
    result = bench(run, **QUICK, layers=False)
    assert result.kernel == build.EMULATION and result.matches_emulation
    assert [w for w in result.warnings if "not available" in w and "fell back" in w and "all 3 binary convs" in w]
    # a second bench in the same process says it again (the runtime itself warns once per process)
    assert any("not available" in w for w in bench(run, **QUICK, layers=False).warnings)


# ---------------------------------------------------------------- bnnslim bench (CLI)


def test_bench_cli_json(run: Path, cli: Callable[..., Result]) -> None:
    result = cli("bench", run, "--json", "--batch", "1", "--batch", "2", "--repeats", "2", "--warmup", "1")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # JSON only on stdout
    assert result.stderr == ""
    assert {"file", "form", "model", "input_shape", "machine", "repeats", "warmup", "runtime_plan",
            "max_abs_difference_packed_vs_torch_binary", "packed_matches_its_emulation", "results",
            "warnings"} <= set(doc)
    assert doc["file"].endswith("model.bnn.safetensors") and doc["packed_matches_its_emulation"] is True
    assert {"cpu", "cores", "kernel", "fast_popcount"} <= set(doc["machine"])
    assert [(r["batch"], r["threads"]) for r in doc["results"]] == [(1, 1), (2, 1)]
    for r in doc["results"]:
        assert all(r["latency_ms"][k] > 0 for k in ("float", "torch_binary", "packed"))
        assert r["speedup"]["packed_vs_float"] > 0
        assert r["layers"] and {"layer", "kind", "ms", "packed_vs_float"} <= set(r["layers"][0])


def test_bench_cli_table_of_a_plain_file(run: Path, cli: Callable[..., Result]) -> None:
    result = cli("bench", run / "model.safetensors", "--repeats", "2", "--warmup", "0")
    assert result.exit_code == 0, result.output
    for words in ("latency", "packed vs float", "torch binary", "per layer, batch 1, 1 thread", "binary conv",
                  "plain file"):
        assert words in result.stdout, words


def test_bench_cli_threads_above_cores_is_a_warning(run: Path, cli: Callable[..., Result]) -> None:
    from bnnslim.runtime import available_cores

    too_many = available_cores() + 1
    result = cli("bench", run, "--threads", too_many, "--repeats", "1", "--warmup", "0", "--no-layers")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and f"--threads {too_many} is above" in result.stderr
    doc = json.loads(cli("bench", run, "--json", "-t", too_many, "--repeats", "1", "--warmup", "0",
                         "--no-layers").stdout)
    assert any("above" in w for w in doc["warnings"])


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case, words", [
    ("missing", ["not found"]),
    ("not bnnslim", ["not a bnnslim model"]),
    ("garbage", ["not a readable safetensors file"]),
    ("truncated", ["not a readable safetensors file"]),
    ("run without export", ["bnnslim export"]),
    ("directory without run", ["not a bnnslim run"]),
    ("zero threads", ["--threads 0"]),
])
def test_bench_cli_bad_input(run: Path, cli: Callable[..., Result], tmp_path: Path, case: str,
                             words: list[str]) -> None:
    if case == "missing":
        target = tmp_path / "nothing.bnn.safetensors"
    elif case == "not bnnslim":
        target = tmp_path / "other.safetensors"
        save_file({"w": torch.zeros(3)}, str(target), metadata={"format": "something-else"})
    elif case == "garbage":
        target = write_bytes(tmp_path / "garbage.safetensors", b"not a safetensors file at all" * 8)
    elif case == "truncated":
        data = (run / "model.bnn.safetensors").read_bytes()
        target = write_bytes(tmp_path / "cut.bnn.safetensors", data[: len(data) // 2])
    elif case == "run without export":
        target = tmp_path / "run"
        target.mkdir()
        shutil.copy(run / "manifest.json", target / "manifest.json")
    elif case == "directory without run":
        target = tmp_path / "empty"
        target.mkdir()
    else:
        target = run
    args = ["--threads", "0"] if case == "zero threads" else []
    assert_clean_error(cli("bench", target, *args, "--repeats", "1"), *words)


# ---------------------------------------------------------------- plan, fusion, other engines


def test_bench_plans_every_binary_conv(run: Path) -> None:
    result = bench(run, **QUICK, layers=False)
    doc = result.to_json()
    binary = result.plan["kernel"] + list(result.plan["emulated"])
    assert sorted(c["layer"] for c in doc["layer_plan"]) == sorted(binary)
    for c in doc["layer_plan"]:
        assert c["runs"] in ("packed", "float") and c["why"] and c["packed_ms"] > 0 and c["float_ms"] > 0
        if c["layer"] in result.plan["fused"] or c["layer"] in result.plan["fused"].values():
            assert c["runs"] == "packed" and "fused (packed bits" in c["why"]
        if c["runs"] == "float":
            assert c["float_ms"] < c["packed_ms"] and c["layer"] in result.plan["emulated"]
    assert result.matches_emulation
    assert bench(run, **QUICK, layers=False, plan_layers=False).layer_plan == []


def test_bench_compare_says_why_an_engine_is_missing(run: Path, monkeypatch: pytest.MonkeyPatch,
                                                     cli: Callable[..., Result]) -> None:
    """An engine whose Python lacks it is listed as not timed, with the worker's reason; the rest still runs."""
    import sys

    monkeypatch.setenv("BNNSLIM_ORT_PYTHON", sys.executable)  # this Python, which may lack onnxruntime
    monkeypatch.setenv("BNNSLIM_LCE_PYTHON", sys.executable)
    result = bench(run, **QUICK, layers=False, plan_layers=False, compare=True)
    assert result.compare is not None and result.compare["latency_ms"]["packed"] > 0
    timed = set(result.compare["packed_speedup"])
    assert timed | set(result.compare["missing"]) >= {"lce"}
    if "lce" in result.compare["missing"]:
        assert result.compare["missing"]["lce"]  # a reason, e.g. "ModuleNotFoundError: No module named ..."
    for name, ratio in result.compare["packed_speedup"].items():
        assert ratio > 0 and result.compare["latency_ms"][name] > 0
    out = cli("bench", run, "--compare", "--no-plan", "--no-layers", "--repeats", "2", "--warmup", "0")
    assert out.exit_code == 0, out.output
    assert "other engines" in out.stdout and "bnnslim packed runtime" in out.stdout


def test_bench_compare_with_onnxruntime(run: Path) -> None:
    from bnnslim.runtime.peers import engine_python

    if engine_python("ort")[0] is None:
        pytest.skip("no Python with onnxruntime (pip install bnnslim[compare] or set BNNSLIM_ORT_PYTHON)")
    result = bench(run, **QUICK, layers=False, plan_layers=False, compare=True)
    assert result.compare is not None
    assert {"ort_fp32:original", "ort_int8:original"} <= set(result.compare["packed_speedup"])
