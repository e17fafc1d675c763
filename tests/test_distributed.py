"""bnnslim under torchrun: two CPU processes with the gloo backend.

Every rank checks, after training and after every pruning decision, that its
weights and masks equal every other rank's (``check_same_on_all_ranks``); a
difference fails the command, so a zero exit code here means the ranks agreed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from bnnslim.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BNNSLIM_DISABLE_EXTERNAL_PLUGINS": "1", "BNNSLIM_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "bnnslim", "--", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_training_and_pruning_on_two_processes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trained = torchrun("binarize", f"{REPO / 'examples/small_cnn.py'}:tiny", "--run", str(run), "--data",
                       "fashion-mnist-mini", "--epochs", "2", "--steps-per-epoch", "4", "--batch-size", "32",
                       "--real-weight-epochs", "1", cwd=tmp_path)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert trained.stdout.count("binary test accuracy") == 1, "only rank 0 prints"
    assert trained.stdout.count("step 1 of 2") == 1
    manifest = RunDir(run).read_manifest()
    assert manifest["binarize"]["processes"] == 2
    assert len(manifest["binarize"]["real_weight_history"]) == 1  # two-step training, ranks agreeing after it

    pruned = torchrun("prune", "--run", str(run), "--keep", "0.5", "--select-steps", "3", "--retrain-steps", "3",
                      "--batch-size", "32", cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert pruned.stdout.count("test accuracy") == 1
    manifest = RunDir(run).read_manifest()
    assert manifest["prune"]["filters_kept"] == round(0.5 * manifest["prune"]["filters_total"])
    masks = {k: v for k, v in load_file(str(run / "pruned.safetensors")).items() if k.startswith("mask.")}
    assert sum(int(m.sum()) for m in masks.values()) == manifest["prune"]["filters_kept"]
    leftovers = [p.name for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, "files are written once, atomically, by rank 0"


@pytest.mark.slow
def test_an_error_stops_every_rank_and_is_shown_once(tmp_path: Path) -> None:
    result = torchrun("prune", "--run", str(tmp_path / "missing"), "--keep", "0.5", cwd=tmp_path)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("error: no bnnslim run") == 1


STALL = """
import os, sys, time
from bnnslim.cli._common import friendly_errors
from bnnslim import distributed as D

@friendly_errors
def step():
    D.init_from_env("cpu")
    if D.rank() == 1:
        time.sleep(float(sys.argv[1]))
    D.barrier()

import typer
try:
    step()
except typer.Exit as exc:  # what the bnnslim command line does with it
    sys.exit(exc.exit_code)
"""


@pytest.mark.slow
def test_a_stalled_process_stops_the_others_after_the_timeout(tmp_path: Path) -> None:
    """BNNSLIM_DIST_TIMEOUT: rank 0 gives up on a stalled rank 1 after 3 s with one clear line, no traceback."""
    import time

    script = tmp_path / "stall.py"
    script.write_text(STALL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BNNSLIM_DIST_TIMEOUT": "3"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29534",
           str(script), "20"]
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - started < 19, "the waiting process did not give up before the stalled one woke"
    assert "waited more than 3 s for the others" in result.stderr, result.stderr
    assert "BNNSLIM_DIST_TIMEOUT" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr


def test_bad_timeout_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnnslim import distributed as D
    from bnnslim.errors import BnnslimError

    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("BNNSLIM_DIST_TIMEOUT", bad)
        with pytest.raises(BnnslimError, match="BNNSLIM_DIST_TIMEOUT"):
            D.timeout_seconds()
    monkeypatch.setenv("BNNSLIM_DIST_TIMEOUT", "90")
    assert D.timeout_seconds() == 90
