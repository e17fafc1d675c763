"""`bnnslim binarize` and `bnnslim info` from the command line: happy paths and every bad input.

Every failure must exit non-zero with one line on stderr that names the problem and
the fix, print no traceback, and leave the run directory as it was.
"""

from __future__ import annotations

import builtins
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from _helpers import BUNDLED, SMALL_CNN, TOY_MODEL, assert_clean_error, snapshot
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from bnnslim.rundir import RunDir

TINY_CNN = f"{SMALL_CNN}:tiny"
QUICK_TRAIN = ("--data", BUNDLED, "--steps-per-epoch", "3", "--batch-size", "32")


def run_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "binary.safetensors"))


# --- happy paths ---------------------------------------------------------------------------------


def test_version(cli) -> None:
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == "bnnslim 0.1.0"


def test_binarize_convert_only_then_info(cli, toy_model_file: Path, tmp_path: Path) -> None:
    result = cli("binarize", toy_model_file)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    out = result.stdout
    assert "│ 3     │ binary" in out
    assert "real (first layer)" in out and "real (last layer)" in out
    assert "run directory: bnnslim-run" in out
    run = RunDir(tmp_path / "bnnslim-run")  # the default, in the working directory
    assert run.read_manifest()["layers"]["binary"] == ["3"]

    info = cli("info")
    assert info.exit_code == 0, info.output
    text = info.stdout
    assert f"{toy_model_file.resolve()}:build_model" in text
    assert "1x8x8" in text and "xnor" in text and "not trained" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") == 8}
    assert set(rows) == {"0", "3", "6"}  # every conv and linear layer
    assert "binary conv" in rows["3"] and "576" in rows["3"]  # 8*8*3*3 weights
    assert "36,864" in rows["3"]  # binary operations per image: 576 per output position, 8x8 positions
    assert "binary" not in rows["0"] and "binary" not in rows["6"]


def test_info_takes_the_run_as_argument_or_option(cli, toy_model_file: Path) -> None:
    assert cli("binarize", toy_model_file, "--run", "elsewhere").exit_code == 0
    assert "binary conv" in cli("info", "elsewhere").stdout
    assert "binary conv" in cli("info", "--run", "elsewhere").stdout


def test_scheme_and_layer_options(cli, toy_model_file: Path, tmp_path: Path) -> None:
    result = cli("binarize", toy_model_file, "--scheme", "bireal", "--binary", "0", "--real", "3")
    assert result.exit_code == 0, result.output
    m = RunDir(tmp_path / "bnnslim-run").read_manifest()
    assert m["scheme"] == "bireal"
    assert m["layers"]["binary"] == ["0"]
    assert m["layers"]["real"]["3"] == "matches a --real pattern"


def test_binarize_first_last(cli, toy_model_file: Path, tmp_path: Path) -> None:
    assert cli("binarize", toy_model_file, "--binarize-first-last", "--scheme", "sign").exit_code == 0
    assert RunDir(tmp_path / "bnnslim-run").read_manifest()["layers"]["binary"] == ["0", "3", "6"]


def test_input_shape_option_overrides_the_file(cli, toy_model_file: Path, tmp_path: Path) -> None:
    assert cli("binarize", toy_model_file, "--input-shape", "3x16x16").exit_code == 0
    m = RunDir(tmp_path / "bnnslim-run").read_manifest()
    assert m["input_shape"] == [3, 16, 16]
    assert m["model"]["in_channels"] == 3  # passed to build_model(in_channels=...)
    assert run_weights(tmp_path / "bnnslim-run")["0.weight"].shape == (8, 3, 3, 3)


def test_train_on_bundled_data(cli, tmp_path: Path) -> None:
    result = cli("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert "epoch 1: train loss" in result.stdout and "epoch 2: train loss" in result.stdout
    assert "binary test accuracy:" in result.stdout
    m = RunDir(tmp_path / "bnnslim-run").read_manifest()
    assert m["dataset"]["name"] == BUNDLED
    assert m["model"]["num_classes"] == 10 and m["input_shape"] == [1, 28, 28]
    b = m["binarize"]
    assert b["trained"] is True and len(b["history"]) == 2
    assert b["train"]["steps_per_epoch"] == 3 and b["train"]["batch_size"] == 32
    assert b["test_accuracy"] == b["history"][-1]["test_accuracy"]
    assert (tmp_path / "bnnslim-run" / "checkpoints" / "train.safetensors").is_file()
    for name in ("1.0", "3.0", "5.0"):  # latent weights of binary convs clipped to [-1, 1]
        assert run_weights(tmp_path / "bnnslim-run")[f"{name}.weight"].abs().max() <= 1.0
    info = cli("info")
    assert info.exit_code == 0 and BUNDLED in info.stdout and f"{100 * b['test_accuracy']:.2f}%" in info.stdout


def test_same_command_gives_the_same_weights(cli, tmp_path: Path) -> None:
    for run in ("a", "b"):
        torch.rand(10)  # whatever the process did before
        assert cli("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "1", "--seed", "7", "--run", run).exit_code == 0
    a, b = run_weights(tmp_path / "a"), run_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def interrupt_after_first_epoch(monkeypatch: pytest.MonkeyPatch, epochs_seen: int = 1) -> None:
    """Make the next training run stop with Ctrl-C once ``epochs_seen`` epochs (of any phase) are checkpointed."""
    import bnnslim.stages.binarize

    real_train = bnnslim.stages.binarize.train_epochs
    seen = 0

    def train_epochs(*args, on_epoch=None, **kwargs):
        def stop(record):
            nonlocal seen
            if on_epoch is not None:
                on_epoch(record)
            seen += 1
            if seen == epochs_seen:
                raise KeyboardInterrupt

        if len(args) < 6 and "checkpoint" not in kwargs:  # the float teacher's phase: not checkpointed
            return real_train(*args, on_epoch=on_epoch, **kwargs)
        return real_train(*args, on_epoch=stop, **kwargs)

    monkeypatch.setattr(bnnslim.stages.binarize, "train_epochs", train_epochs)


def test_resume_continues_an_interrupted_run_exactly(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "2")
    assert cli(*args, "--run", "straight").exit_code == 0

    with monkeypatch.context() as m:
        interrupt_after_first_epoch(m)
        stopped = cli(*args, "--run", "resumed")
    assert stopped.exit_code == 130
    assert "interrupted" in stopped.stderr and "--resume" in stopped.stderr and "Traceback" not in stopped.output
    assert not (tmp_path / "resumed" / "binary.safetensors").exists()

    torch.rand(10)
    resumed = cli(*args, "--run", "resumed", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "epoch 1:" not in resumed.stdout and "epoch 2:" in resumed.stdout  # epoch 1 is not trained again
    a, b = run_weights(tmp_path / "straight"), run_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [RunDir(tmp_path / r).read_manifest()["binarize"]["history"] for r in ("straight", "resumed")]
    assert history[0] == history[1]


def test_distil_from_a_float_teacher_trained_first_and_resume_exactly(cli, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "2", "--teacher-epochs", "1", "--temperature", "2")
    straight = cli(*args, "--run", "straight")
    assert straight.exit_code == 0
    m = RunDir(tmp_path / "straight").read_manifest()
    assert m["teacher"]["epochs"] == 1 and m["teacher"]["temperature"] == 2.0
    out = straight.stdout
    float_phase = out.index("float teacher: training the float model for 1 epoch\n")
    assert float_phase < out.index("epoch 1:") < out.index("epoch 2:")  # its progress is shown
    assert "KL" in m["binarize"]["loss"] and 0 < m["binarize"]["teacher_test_accuracy"] <= 1
    teacher = load_file(str(tmp_path / "straight" / "teacher.safetensors"))
    assert "1.0.weight" in teacher  # the float twin, same layer names
    plain = cli("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "2", "--run", "plain")
    assert plain.exit_code == 0
    a, p = run_weights(tmp_path / "straight"), run_weights(tmp_path / "plain")
    assert any(not torch.equal(a[k], p[k]) for k in a), "the teacher changed nothing"

    with monkeypatch.context() as mp:
        interrupt_after_first_epoch(mp)
        assert cli(*args, "--run", "resumed").exit_code == 130
    resumed = cli(*args, "--run", "resumed", "--resume")
    assert resumed.exit_code == 0, resumed.output
    b = run_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = cli(*args[:-2], "--temperature", "3", "--run", "resumed", "--resume", "--overwrite")
    assert changed.exit_code != 0 and "teacher" in changed.output


@pytest.mark.parametrize("stop_after", [1, 3], ids=["in-step-1", "in-step-2"])
def test_two_step_training_trains_real_weights_first_and_resumes_exactly(cli, tmp_path: Path, stop_after: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "2", "--real-weight-epochs", "2")
    straight = cli(*args, "--run", "straight")
    assert straight.exit_code == 0, straight.output
    assert "step 1 of 2: 2 epochs with binary activations and real weights" in straight.stdout
    assert "step 2 of 2" in straight.stdout
    m = RunDir(tmp_path / "straight").read_manifest()
    assert m["two_step"]["real_weight_epochs"] == 2
    assert len(m["binarize"]["real_weight_history"]) == 2 and len(m["binarize"]["history"]) == 2
    info = cli("info", "--run", "straight")
    assert "two-step: 2 epochs with real weights" in " ".join(info.stdout.split())
    exported = cli("export", "--run", "straight", "--format", "plain")
    assert exported.exit_code == 0, exported.output
    report = json.loads(next((tmp_path / "straight").glob("*report*.json")).read_text())
    assert report["training"]["binarize"]["two_step"]["real_weight_epochs"] == 2
    assert cli("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "2", "--run", "plain").exit_code == 0
    a, plain = run_weights(tmp_path / "straight"), run_weights(tmp_path / "plain")
    assert any(not torch.equal(a[k], plain[k]) for k in a), "step 1 changed nothing"

    with monkeypatch.context() as mp:
        interrupt_after_first_epoch(mp, stop_after)
        assert cli(*args, "--run", "resumed").exit_code == 130
    resumed = cli(*args, "--run", "resumed", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert ("step 1 of 2" in resumed.stdout) == (stop_after <= 2)  # a finished step 1 is not run again
    b = run_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert RunDir(tmp_path / "resumed").read_manifest()["binarize"]["real_weight_history"] == \
        m["binarize"]["real_weight_history"]
    other = cli("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "2", "--run", "resumed", "--resume", "--overwrite")
    assert other.exit_code != 0 and "two_step" in other.output


def test_distil_from_float_weights_in_a_file(cli, tmp_path: Path) -> None:
    from bnnslim.model_source import load_model_source

    torch.manual_seed(3)
    float_model = load_model_source(TINY_CNN).build(num_classes=10, in_channels=1)
    save_file(float_model.state_dict(), str(tmp_path / "float.safetensors"))
    result = cli("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "1", "--teacher", "float.safetensors")
    assert result.exit_code == 0, result.output
    m = RunDir(tmp_path / "bnnslim-run").read_manifest()
    assert m["teacher"]["weights"] == "float.safetensors" and len(m["teacher"]["sha256"]) == 64
    assert not (tmp_path / "bnnslim-run" / "teacher.safetensors").exists()
    missing = cli("binarize", TINY_CNN, *QUICK_TRAIN, "--teacher", "nope.pt", "--run", "other")
    assert_clean_error(missing, "teacher")


def toy_state(tmp_path: Path) -> dict[str, torch.Tensor]:
    """The state_dict of toy.py's model with recognisable values."""
    from bnnslim.model_source import load_model_source

    model = load_model_source(str(tmp_path / "toy.py")).build()
    return {k: torch.full_like(v, 0.5) + i * 0.01 if v.is_floating_point() else v + i
            for i, (k, v) in enumerate(model.state_dict().items())}


def test_weights_from_safetensors(cli, toy_model_file: Path, tmp_path: Path) -> None:
    state = toy_state(tmp_path)
    save_file(state, str(tmp_path / "start.safetensors"))
    assert cli("binarize", toy_model_file, "--weights", "start.safetensors").exit_code == 0
    saved = run_weights(tmp_path / "bnnslim-run")
    assert all(torch.equal(saved[k], v) for k, v in state.items())


@pytest.mark.parametrize("wrapped", [False, True], ids=["state_dict", "checkpoint-dict"])
def test_weights_from_pytorch_state_dict(cli, toy_model_file: Path, tmp_path: Path, wrapped: bool) -> None:
    state = toy_state(tmp_path)
    torch.save({"state_dict": state, "epoch": 3} if wrapped else state, tmp_path / "start.pt")
    assert cli("binarize", toy_model_file, "--weights", "start.pt").exit_code == 0
    saved = run_weights(tmp_path / "bnnslim-run")
    assert all(torch.equal(saved[k], v) for k, v in state.items())


# --- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def existing_run(cli, toy_model_file: Path, tmp_path: Path) -> Path:
    """A finished run of toy.py in ./bnnslim-run."""
    assert cli("binarize", toy_model_file).exit_code == 0
    return tmp_path / "bnnslim-run"


def fails_cleanly(cli, args: tuple, *words: str, run: Path | None = None) -> str:
    """Run ``bnnslim ARGS``; assert a clean failure mentioning ``words`` that leaves ``run`` as it was."""
    before = snapshot(run) if run is not None else None
    result = cli(*args)
    line = assert_clean_error(result, *words)
    if run is not None:
        assert snapshot(run) == before, "the run directory changed"
    return line


def test_missing_model_file(cli, tmp_path: Path) -> None:
    fails_cleanly(cli, ("binarize", "nope.py"), "nope.py", "not found", "give the path", run=tmp_path / "bnnslim-run")
    assert not (tmp_path / "bnnslim-run").exists()


def test_syntax_error_in_model_file(cli, write_model, tmp_path: Path) -> None:
    path = write_model("from torch import nn\n\ndef build_model()\n    return nn.Conv2d(1, 2, 3)\n")
    fails_cleanly(cli, ("binarize", path), "syntax error", "net.py line 3", "def build_model()", "fix the model file")
    assert not (tmp_path / "bnnslim-run").exists()


def test_exception_in_model_file(cli, write_model, tmp_path: Path) -> None:
    path = write_model("import torch\n\nWIDTH = int('wide')\n")
    fails_cleanly(cli, ("binarize", path), "importing net.py failed", "ValueError", "line 3: WIDTH = int('wide')")
    assert not (tmp_path / "bnnslim-run").exists()


def test_no_model_in_file(cli, write_model, tmp_path: Path) -> None:
    path = write_model("import torch\nSIZE = 3\n")
    fails_cleanly(cli, ("binarize", path), "no model found in net.py", "build_model()", "net.py:NAME")
    assert not (tmp_path / "bnnslim-run").exists()


def test_several_models_in_file(cli, write_model, tmp_path: Path) -> None:
    path = write_model("""
        from torch import nn
        class A(nn.Module):
            pass
        class B(nn.Module):
            pass
    """)
    fails_cleanly(cli, ("binarize", path), "several models in net.py: A, B", "net.py:NAME")
    assert not (tmp_path / "bnnslim-run").exists()


def test_nothing_to_binarize(cli, write_model, tmp_path: Path) -> None:
    path = write_model("""
        from torch import nn
        INPUT_SHAPE = (1, 8, 8)
        def build_model():
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 2))
    """)
    fails_cleanly(cli, ("binarize", path), "nothing to binarize", "first layer", "--binary")
    assert not (tmp_path / "bnnslim-run").exists()


def test_layer_pattern_matching_nothing(cli, toy_model_file: Path, tmp_path: Path) -> None:
    fails_cleanly(cli, ("binarize", toy_model_file, "--real", "features.*"), "'features.*' matches no conv layer",
                  "named: 0, 3, 6")
    assert not (tmp_path / "bnnslim-run").exists()


def test_unknown_dataset_lists_the_known_ones(cli, toy_model_file: Path, tmp_path: Path) -> None:
    fails_cleanly(cli, ("binarize", toy_model_file, "--data", "imagenette"), "unknown dataset 'imagenette'",
                  "cifar10", BUNDLED, "mnist")
    assert not (tmp_path / "bnnslim-run").exists()


def test_unknown_scheme_lists_the_known_ones(cli, toy_model_file: Path, tmp_path: Path) -> None:
    fails_cleanly(cli, ("binarize", toy_model_file, "--scheme", "ternary"), "unknown scheme 'ternary'",
                  "choose one of: bireal, sign, xnor")
    assert not (tmp_path / "bnnslim-run").exists()


def test_dataset_needs_data_root(cli, tmp_path: Path) -> None:
    fails_cleanly(cli, ("binarize", TINY_CNN, "--data", "mnist"), "'mnist' needs --data-root", "--data-root ROOT")
    assert not (tmp_path / "bnnslim-run").exists()


def test_data_root_missing(cli, tmp_path: Path) -> None:
    fails_cleanly(cli, ("binarize", TINY_CNN, "--data", "folder", "--data-root", "pictures"),
                  "pictures does not exist", "train/<class>")
    assert not (tmp_path / "bnnslim-run").exists()


def test_data_root_in_the_wrong_layout(cli, tmp_path: Path) -> None:
    (tmp_path / "pictures" / "cats").mkdir(parents=True)  # classes directly under the root: no train/
    fails_cleanly(cli, ("binarize", TINY_CNN, "--data", "folder", "--data-root", "pictures"),
                  "has no train/ folder", "expected ROOT/train/<class>")
    assert not (tmp_path / "bnnslim-run").exists()


def test_data_root_is_a_file(cli, tmp_path: Path) -> None:
    (tmp_path / "data.zip").write_bytes(b"PK")
    fails_cleanly(cli, ("binarize", TINY_CNN, "--data", "cifar10", "--data-root", "data.zip"),
                  "data.zip is a file, not a folder")
    assert not (tmp_path / "bnnslim-run").exists()


FIXED_SIZE_MODEL = """
    from torch import nn
    def build_model():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(),
                             nn.Linear(4 * 32 * 32, 10))
"""


def test_input_shape_the_model_rejects(cli, write_model, tmp_path: Path) -> None:
    path = write_model(FIXED_SIZE_MODEL)
    fails_cleanly(cli, ("binarize", path, "--input-shape", "1,28,28"), "rejects inputs of shape (1, 28, 28)",
                  "RuntimeError", "--input-shape C,H,W")
    assert not (tmp_path / "bnnslim-run").exists()


def test_dataset_shape_the_model_rejects(cli, write_model, tmp_path: Path) -> None:
    path = write_model(FIXED_SIZE_MODEL)
    fails_cleanly(cli, ("binarize", path, *QUICK_TRAIN), "rejects inputs of shape (1, 28, 28)")
    assert not (tmp_path / "bnnslim-run").exists()


def test_input_shape_unknown(cli, write_model, tmp_path: Path) -> None:
    path = write_model(FIXED_SIZE_MODEL)
    fails_cleanly(cli, ("binarize", path), "input shape is unknown", "--input-shape C,H,W", "INPUT_SHAPE")
    assert not (tmp_path / "bnnslim-run").exists()


@pytest.mark.parametrize("text", ["abc", "0,28,28", "3;32;32"])
def test_bad_input_shape_text(cli, toy_model_file: Path, tmp_path: Path, text: str) -> None:
    fails_cleanly(cli, ("binarize", toy_model_file, "--input-shape", text), f"bad input shape '{text}'", "e.g. 3,32,32")
    assert not (tmp_path / "bnnslim-run").exists()


def test_run_directory_of_another_model(cli, existing_run: Path, write_model) -> None:
    other = write_model(textwrap.dedent(TOY_MODEL) + "\n# another model\n", "other.py")
    fails_cleanly(cli, ("binarize", other), "'bnnslim-run' belongs to another model", "toy.py", "--run DIR",
                  "--overwrite", run=existing_run)


def test_run_directory_of_another_model_can_be_overwritten(cli, existing_run: Path, write_model) -> None:
    other = write_model(textwrap.dedent(TOY_MODEL) + "\n# another model\n", "other.py")
    assert cli("binarize", other, "--overwrite").exit_code == 0
    assert RunDir(existing_run).read_manifest()["model"]["source"].endswith("other.py")


def test_run_directory_of_an_edited_model(cli, existing_run: Path, toy_model_file: Path) -> None:
    toy_model_file.write_text(toy_model_file.read_text() + "\n# edited\n")
    fails_cleanly(cli, ("binarize", toy_model_file), "belongs to another model", run=existing_run)
    fails_cleanly(cli, ("info",), "changed since the run directory was made", "--run DIR", run=existing_run)


def test_run_directory_that_is_not_a_run(cli, toy_model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8")
    fails_cleanly(cli, ("binarize", toy_model_file, "--run", "photos"), "not a bnnslim run directory",
                  run=tmp_path / "photos")


def test_info_without_a_run(cli, tmp_path: Path) -> None:
    fails_cleanly(cli, ("info",), "no bnnslim run in 'bnnslim-run'", "bnnslim binarize MODEL.py")
    assert not (tmp_path / "bnnslim-run").exists()


def test_weights_file_missing(cli, toy_model_file: Path, tmp_path: Path) -> None:
    fails_cleanly(cli, ("binarize", toy_model_file, "--weights", "start.safetensors"), "start.safetensors",
                  "not found", "--weights")
    assert not (tmp_path / "bnnslim-run").exists()


def test_weights_of_unknown_format(cli, toy_model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "start.h5").write_bytes(b"\x89HDF")
    fails_cleanly(cli, ("binarize", toy_model_file, "--weights", "start.h5"), "unknown weights format '.h5'",
                  ".safetensors")
    assert not (tmp_path / "bnnslim-run").exists()


def test_weights_that_do_not_fit(cli, toy_model_file: Path, tmp_path: Path) -> None:
    save_file(nn.Conv2d(1, 2, 3).state_dict(), str(tmp_path / "start.safetensors"))
    fails_cleanly(cli, ("binarize", toy_model_file, "--weights", "start.safetensors"), "do not fit the model",
                  "missing")
    assert not (tmp_path / "bnnslim-run").exists()


def test_weights_damaged_safetensors(cli, toy_model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "start.safetensors").write_bytes(b"\x00" * 5)
    fails_cleanly(cli, ("binarize", toy_model_file, "--weights", "start.safetensors"),
                  "not a readable safetensors file")
    assert not (tmp_path / "bnnslim-run").exists()


def test_pickled_model_is_refused(cli, toy_model_file: Path, tmp_path: Path) -> None:
    """A whole pickled module needs weights_only=False: bnnslim refuses it."""
    from bnnslim.model_source import load_model_source

    torch.save(load_model_source(str(toy_model_file)).build(), tmp_path / "whole.pt")
    fails_cleanly(cli, ("binarize", toy_model_file, "--weights", "whole.pt"), "weights-only", "state_dict",
                  "torch.nn.modules.container.Sequential")  # names what it refused
    assert not (tmp_path / "bnnslim-run").exists()


@pytest.mark.parametrize("content", [b"garbage", b""], ids=["junk", "empty"])
def test_weights_pt_that_is_not_a_checkpoint(cli, toy_model_file: Path, tmp_path: Path, content: bytes) -> None:
    (tmp_path / "start.pt").write_bytes(content)
    line = fails_cleanly(cli, ("binarize", toy_model_file, "--weights", "start.pt"), "start.pt", "weights-only",
                         "save a state_dict")
    assert "False" not in line  # never the advice to load with weights_only=False
    assert not (tmp_path / "bnnslim-run").exists()


class _Payload:
    """Unpickling this creates a file: proof that arbitrary code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_weights_pickle_code_never_runs(cli, toy_model_file: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"0.weight": _Payload(marker)}, tmp_path / "evil.pt")
    fails_cleanly(cli, ("binarize", toy_model_file, "--weights", "evil.pt"), "weights-only")
    assert not marker.exists()
    assert not (tmp_path / "bnnslim-run").exists()


def test_resume_with_nothing_to_resume(cli, toy_model_file: Path, tmp_path: Path) -> None:
    fails_cleanly(cli, ("binarize", TINY_CNN, *QUICK_TRAIN, "--resume"), "nothing to resume", "without --resume")
    assert not (tmp_path / "bnnslim-run").exists()


def test_resume_a_run_that_was_never_trained(cli, existing_run: Path, toy_model_file: Path) -> None:
    fails_cleanly(cli, ("binarize", toy_model_file, "--resume"), "nothing to resume", run=existing_run)


@pytest.fixture(scope="module")
def interrupted_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch training run of the tiny CNN stopped after epoch 1 (trained once per module)."""
    from bnnslim.cli.app import app

    base = tmp_path_factory.mktemp("interrupted")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(base)
        m.setenv("BNNSLIM_DISABLE_EXTERNAL_PLUGINS", "1")
        m.setenv("BNNSLIM_OFFLINE", "1")
        interrupt_after_first_epoch(m)
        result = CliRunner().invoke(app, ["binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "2"])
        assert result.exit_code == 130, result.output
    return base / "bnnslim-run"


@pytest.fixture
def interrupted_run(interrupted_once: Path, tmp_path: Path) -> Path:
    """A copy of the interrupted run in the test's working directory (each test may change its own)."""
    return Path(shutil.copytree(interrupted_once, tmp_path / "bnnslim-run"))


@pytest.mark.parametrize("changed", [("--lr", "0.01"), ("--epochs", "3"), ("--batch-size", "16")],
                         ids=lambda c: c[0])
def test_resume_with_changed_training_options(cli, interrupted_run: Path, changed: tuple[str, str]) -> None:
    fails_cleanly(cli, ("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "2", "--resume", *changed),
                  "--resume with different", "use the same options", run=interrupted_run)


@pytest.mark.parametrize("changed", [("--scheme", "sign"), ("--real", "3.0"), ("--binarize-first-last",)],
                         ids=lambda c: c[0])
def test_resume_with_changed_binarization(cli, interrupted_run: Path, changed: tuple[str, ...]) -> None:
    fails_cleanly(cli, ("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "2", "--resume", *changed),
                  "--resume with different", run=interrupted_run)


def test_resume_needs_data(cli, interrupted_run: Path) -> None:
    fails_cleanly(cli, ("binarize", TINY_CNN, "--resume"), "--resume needs --data", run=interrupted_run)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_gpu(cli, tmp_path: Path) -> None:
    fails_cleanly(cli, ("binarize", TINY_CNN, *QUICK_TRAIN, "--device", "cuda"), "no CUDA GPU", "--device cpu")
    assert not (tmp_path / "bnnslim-run").exists()


def test_users_error_text_is_shown_verbatim_on_one_line(cli, write_model, tmp_path: Path) -> None:
    path = write_model('raise ValueError("layer sizes [bold] and [4, 4]\\ndo not match")\n')
    line = fails_cleanly(cli, ("binarize", path), "ValueError")
    assert "layer sizes [bold] and [4, 4] do not match" in line  # not eaten as Rich markup
    assert "net.py line 1" in line


def test_new_run_interrupted_early_cannot_resume_the_old_one(cli, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Retraining in the same run dir, stopped before its first checkpoint: the old run's state is gone."""
    import bnnslim.stages.binarize

    assert cli("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "1").exit_code == 0
    real_train = bnnslim.stages.binarize.train_epochs

    def train_epochs(*args, on_step=None, **kwargs):
        def stop(event):
            raise KeyboardInterrupt

        return real_train(*args, on_step=stop, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(bnnslim.stages.binarize, "train_epochs", train_epochs)
        result = cli("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "1", "--scheme", "sign", "--overwrite")
        assert result.exit_code == 130
    assert not (tmp_path / "bnnslim-run" / "binary.safetensors").exists()  # not the xnor run's weights
    fails_cleanly(cli, ("binarize", TINY_CNN, *QUICK_TRAIN, "--epochs", "1", "--scheme", "sign", "--resume"),
                  "nothing to resume")
    fails_cleanly(cli, ("info",), "binary.safetensors", "not found")
