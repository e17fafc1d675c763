"""Shared helpers for the benchmark scripts: machine description, result files, interleaved timing."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine() -> str:
    cpu, isa = platform.processor() or "?", "?"
    try:
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
        isa = ("AVX-512" + (" VPOPCNTDQ" if "avx512_vpopcntdq" in flags else "") if "avx512f" in flags
               else "AVX2" if "avx2" in flags else "no AVX2")
    except OSError:
        pass
    return (f"{cpu} ({isa}), {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, {platform.system()} {platform.machine()}")


def command() -> str:
    return "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]])


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def header(title: str) -> str:
    return (f"# {title}\n\n- command: `{command()}`\n- machine: {machine()}\n- revision: {git_revision()}\n"
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")


NOTES = "<!-- notes: kept when the tables above are rewritten -->"


def write_record(path: Path, text: str) -> None:
    """Write a benchmark record, keeping the hand-written notes below :data:`NOTES` in the file it replaces.

    Written to a temporary file and renamed, so an interrupted rewrite leaves the old record whole.
    """
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    notes = old.split(NOTES, 1)[1] if NOTES in old else "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text.rstrip() + "\n\n" + NOTES + notes, encoding="utf-8")
    tmp.replace(path)


def interleaved_times(calls: dict[str, Callable[[], object]], rounds: int, inner: int,
                      warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each contender, one entry per round: every round times ``inner`` calls of each, in
    alternating order (a shared machine's drift hits all contenders alike), after ``warmup`` calls each."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for call in calls.values():
        for _ in range(warmup):
            call()
    for r in range(rounds):
        for k in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            start = time.perf_counter()
            for _ in range(inner):
                calls[k]()
            times[k].append((time.perf_counter() - start) / inner)
    return times
