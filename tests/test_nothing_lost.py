"""Nothing lost, nothing mixed up: run locks, digests between stages, atomic writes, export -o, binarize refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _helpers import BUNDLED, SMALL_CNN
from typer.testing import CliRunner

from bnnslim._atomic import remove_stale_temporaries, save_tensors, write_json
from bnnslim.cli.app import app
from bnnslim.errors import BnnslimError
from bnnslim.rundir import RunDir, save_weights
from bnnslim.runlock import lock_path, run_lock
from bnnslim.stages.binarize import BinarizeOptions, binarize
from bnnslim.stages.prune import PruneOptions, prune
from bnnslim.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in result.output, result.output


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pruned") / "run"
    binarize(BinarizeOptions(model=f"{SMALL_CNN}:tiny", run=run, data=BUNDLED,
                             train=TrainConfig(epochs=1, steps_per_epoch=2, batch_size=16)))
    prune(run, PruneOptions(keep=0.6, strategy="random", select_steps=1, retrain_steps=1, batch_size=16, heldout=32))
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


# ------------------------------------------------------------------ locks


HOLDER = """
import sys, time
from pathlib import Path
from bnnslim.runlock import run_lock
with run_lock(Path(sys.argv[1]), "prune"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_command_on_a_locked_run_names_the_holder(pruned: Path, tmp_path: Path) -> None:
    run = copy_run(pruned, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        for args in (("export", "--run", run, "--no-evaluate"), ("prune", "--run", run, "--keep", "0.5"),
                     ("binarize", f"{SMALL_CNN}:tiny", "--run", run, "--overwrite"), ("trust", "--run", run)):
            refused(cli(*args), "is in use by `bnnslim prune`", f"process {holder.pid}")
        assert snapshot(run) == before
        assert cli("info", "--run", run).exit_code == 0  # readers are not blocked
    finally:
        holder.kill()  # kill -9: the kernel drops the lock
        holder.wait()
    assert cli("export", "--run", run, "-f", "plain", "--no-evaluate").exit_code == 0


def test_lock_is_reentrant_in_one_process_and_released(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with run_lock(run, "prune"), run_lock(run, "export"):
        pass
    assert not run.exists()  # the lock lives beside the run, so a fresh run directory stays empty
    assert lock_path(run).parent == tmp_path
    with run_lock(run, "export"):
        pass


# ------------------------------------------------------------------ digests between stages


def test_pruned_weights_that_do_not_belong_to_the_manifest_are_refused(pruned: Path, tmp_path: Path) -> None:
    run = copy_run(pruned, tmp_path)
    other = copy_run(pruned, tmp_path / "other")
    prune(other, PruneOptions(keep=0.4, strategy="random", select_steps=1, retrain_steps=1, batch_size=16,
                              heldout=32))
    shutil.copy(other / "pruned.safetensors", run / "pruned.safetensors")  # another prune's result
    before = snapshot(run)
    refused(cli("export", "--run", run, "--no-evaluate"), "does not belong to run", "sha256")
    assert snapshot(run) == before


def test_binary_weights_that_do_not_belong_to_the_manifest_are_refused(pruned: Path, tmp_path: Path) -> None:
    run = copy_run(pruned, tmp_path)
    from bnnslim.run_model import load_run_model

    model = load_run_model(RunDir(run)).model
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_weights(RunDir(run).binary_weights, model, kind="binary-latent")
    refused(cli("info", "--run", run), "binary.safetensors", "does not belong to run")
    refused(cli("prune", "--run", run, "--keep", "0.5"), "does not belong to run")


# ------------------------------------------------------------------ binarize never silently replaces work


def test_binarize_refuses_to_replace_a_trained_and_pruned_run_of_the_same_model(pruned: Path, tmp_path: Path) -> None:
    run = copy_run(pruned, tmp_path)
    before = snapshot(run)
    refused(cli("binarize", f"{SMALL_CNN}:tiny", "--run", run), "already holds a trained binary network",
            "a pruned network", "--overwrite")
    assert snapshot(run) == before
    assert cli("binarize", f"{SMALL_CNN}:tiny", "--run", run, "--overwrite").exit_code == 0


# ------------------------------------------------------------------ atomic writes


def test_output_files_follow_the_umask_and_leave_no_temporaries(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "t.safetensors"]


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, time, torch
        from pathlib import Path
        from bnnslim._atomic import atomic_path
        with atomic_path(Path({str(tmp_path / 'w.safetensors')!r})) as tmp:
            tmp.write_bytes(b"partial")
            print("writing", flush=True)
            time.sleep(120)
    """)
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
    live = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(live) == 1
    assert remove_stale_temporaries(tmp_path / "w.safetensors") == []  # its writer is alive: kept
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert live[0].exists()
    save_tensors(tmp_path / "w.safetensors", {"w": torch.ones(1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_disk_full_is_one_clear_error_and_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors reports ENOSPC as SafetensorError (its own type): it becomes a BnnslimError, the old file stays."""
    import safetensors.torch
    from safetensors import SafetensorError

    target = tmp_path / "w.safetensors"
    save_tensors(target, {"w": torch.zeros(2)})
    before = target.read_bytes()

    def full(tensors, filename, metadata=None):  # what safetensors raises when the disk fills
        Path(filename).write_bytes(b"\0" * 10)
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(BnnslimError, match=r"no space left to write .*w\.safetensors"):
        save_tensors(target, {"w": torch.ones(2)})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_write_error_from_the_writer_is_a_clear_error(tmp_path: Path) -> None:
    """A real ENOSPC: the writer inside atomic_path copies to /dev/full."""
    from bnnslim._atomic import atomic_path

    with pytest.raises(BnnslimError, match="no space left"), atomic_path(tmp_path / "x.bin"), \
            open("/dev/full", "wb") as f:
        f.write(b"x" * (1 << 16))
        f.flush()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ export -o


def test_export_output_file_leaves_the_runs_report_alone(pruned: Path, tmp_path: Path) -> None:
    run = copy_run(pruned, tmp_path)
    assert cli("export", "--run", run, "--no-evaluate").exit_code == 0
    report = (run / "export-report.json").read_bytes()
    chart = (run / "kept-filters.png").read_bytes()
    result = cli("export", "--run", run, "-f", "packed", "-o", tmp_path / "elsewhere.bnn.safetensors", "--no-evaluate")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "elsewhere.bnn.safetensors").is_file()
    assert (run / "export-report.json").read_bytes() == report and (run / "kept-filters.png").read_bytes() == chart
    assert json.loads(report)["files"]["packed"].endswith("run/model.bnn.safetensors")


def test_export_output_naming_a_directory(pruned: Path, tmp_path: Path) -> None:
    run = copy_run(pruned, tmp_path)
    before = snapshot(run)
    refused(cli("export", "--run", run, "-f", "plain", "-o", tmp_path, "--no-evaluate"), "is a directory")
    assert snapshot(run) == before
