"""Shared helpers for the benchmark scripts: machine description, result files, interleaved timing."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
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
        if avx512_hidden():
            isa = f"{isa} hidden: AVX2 only, CPUID masked by cpuid_without_avx512.c"
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


CPUID_MASK_SOURCE = Path(__file__).resolve().parent / "cpuid_without_avx512.c"


def without_avx512_env() -> tuple[dict[str, str], str]:
    """Environment that makes a process and its children see this CPU without AVX-512 and VNNI, and why not.

    Returns ``({"LD_PRELOAD": library}, "")`` where the kernel offers CPUID faulting (``cpuid_fault`` in
    /proc/cpuinfo) and a C compiler builds :data:`CPUID_MASK_SOURCE` (cached by its hash under
    ``~/.cache/bnnslim-benchmarks``) and a child process then reads no AVX512F from CPUID; otherwise
    ``({}, reason)``. Every engine that picks its kernels from CPUID (ONNX Runtime's MLAS, LCE's, torch's
    cpuinfo and oneDNN, bnnslim's ``__builtin_cpu_supports``) then takes its AVX2 code.
    """
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        flags = []
    if "avx512f" not in flags:
        return {}, "the CPU has no AVX-512 to hide"
    if "cpuid_fault" not in flags:
        return {}, "the kernel offers no CPUID faulting here (no cpuid_fault flag)"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return {}, "no C compiler (cc) to build the CPUID mask"
    source = CPUID_MASK_SOURCE.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bnnslim-benchmarks"
    library = cache / f"cpuid_without_avx512-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not library.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = library.with_name(library.name + f".{os.getpid()}.tmp")
        built = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(CPUID_MASK_SOURCE), "-ldl"],
                               capture_output=True, text=True)
        if built.returncode != 0:
            return {}, f"the CPUID mask did not build: {(built.stderr.strip().splitlines() or ['?'])[-1]}"
        tmp.replace(library)
    env = {"LD_PRELOAD": str(library)}
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env={**os.environ, **env}, capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "AVX2":
        return {}, f"the CPUID mask did not take (torch saw {probe.stdout.strip() or probe.stderr.strip()[-200:]})"
    return env, ""


def avx512_hidden() -> bool:
    """Whether this process runs with :data:`CPUID_MASK_SOURCE`'s library preloaded (AVX-512 hidden)."""
    return "cpuid_without_avx512" in os.environ.get("LD_PRELOAD", "")


def rerun_without_avx512(argv: list[str] | None = None) -> None:
    """Run this script again, in this process, on the CPU without AVX-512 (:func:`without_avx512_env`).

    For a benchmark's ``--without-avx512``: returns at once where it already runs so; exits with the reason
    where the mask cannot be had.
    """
    if avx512_hidden():
        return
    env, why = without_avx512_env()
    if why:
        raise SystemExit(f"--without-avx512: {why}")
    sys.stdout.flush()
    args = sys.argv[1:] if argv is None else argv
    os.execve(sys.executable, [sys.executable, sys.argv[0], *args], {**os.environ, **env})
