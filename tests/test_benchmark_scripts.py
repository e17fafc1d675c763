"""Every benchmark script still runs: a smallest run of each writes its report (the recorded ones stay
reproducible when the code under them changes; three had stopped running before this test existed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import REPO

BENCHMARKS = REPO / "benchmarks"

#: script -> the smallest arguments that still go through all of its code (``--out`` is added)
SMOKE_ARGS: dict[str, list[str]] = {
    "binarize_fashion_mnist.py": ["--report-only"],
    "prune_accuracy.py": ["--report-only"],
    "prune_overhead.py": ["--groups", "2", "--steps", "1"],
    "prune_fashion_mnist.py": ["--data", "fashion-mnist-mini", "--epochs", "1", "--keeps", "0.5", "--models",
                               "small_cnn.py", "--strategies", "subsidiary", "l1", "--select-steps", "1",
                               "--retrain-steps", "1", "--work", "{tmp}/work"],
    "train_throughput.py": ["--steps", "2", "--repeats", "1"],
    "export_sizes_latency.py": ["--models", "vgg11", "--train-steps", "2", "--retrain-steps", "1",
                                "--rounds-small", "1", "--rounds-large", "1", "--batches", "1", "--threads", "1",
                                "--workdir", "{tmp}/work"],
    "runtime_layers.py": ["--rounds", "1", "--inner", "1", "--warmup", "0"],
    "runtime_end_to_end.py": ["--networks", "vgg11", "--train-steps", "2", "--retrain-steps", "1", "--rounds", "1",
                              "--inner", "1", "--workdir", "{tmp}/work"],
    "runtime_first_conv.py": ["--rounds", "1", "--inner", "1"],
    "runtime_paired_taps.py": ["--rounds", "1", "--inner", "1"],
    "runtime_avx2_kernels.py": ["--rounds", "1", "--inner", "1"],
    "runtime_planned_blocks.py": ["--rounds", "1", "--inner", "1"],
    "runtime_popcount_peak.py": ["--rounds", "1"],
    "runtime_torchvision.py": ["--models", "resnet18", "--rounds", "1", "--inner", "1"],
    "runtime_vs_peers.py": ["--networks", "vgg11", "--rounds", "1", "--inner", "1"],
    "runtime_revisions.py": ["--base", "HEAD", "--networks", "vgg11", "--pairs", "1", "--rounds", "1",
                             "--inner", "1"],
}


def test_every_benchmark_script_has_a_smoke_run() -> None:
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(SMOKE_ARGS), "add the new script's smallest run to SMOKE_ARGS (or drop a removed one)"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE_ARGS))
def test_a_benchmark_script_writes_its_report(script: str, tmp_path: Path) -> None:
    if script == "runtime_revisions.py" and (shutil.which("git") is None or not (REPO / ".git").exists()):
        pytest.skip("runtime_revisions.py compares git revisions: needs a git checkout")
    out = tmp_path / "report.md"
    args = [a.replace("{tmp}", str(tmp_path)) for a in SMOKE_ARGS[script]]
    env = {k: v for k, v in os.environ.items() if k not in ("BNNSLIM_ORT_PYTHON", "BNNSLIM_LCE_PYTHON")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    report = out.read_text()
    assert report.startswith("# ") and "- command: `" in report, f"{script}'s report has no header naming its command"
    assert "|---" in report, f"{script}'s report has no table"
