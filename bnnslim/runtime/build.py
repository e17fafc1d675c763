"""Build the runtime's C++ kernels once, pick the instruction set, or fall back.

The kernels (``_kernels.cpp``) are compiled on first use with
``torch.utils.cpp_extension.load`` (needs a C++ compiler and ninja) into
``$BNNSLIM_CACHE_DIR/torch_extensions/<name>`` (default ``~/.cache/bnnslim``),
where ``<name>`` hashes the source, torch's version and Python's, so an edited
source or another torch builds afresh and every later process loads the cached
library in well under a second. The build uses baseline x86-64 flags: the
AVX-512 and AVX2 functions carry their own target attributes and the library
picks one at run time (``__builtin_cpu_supports``), so one build serves any CPU.

When the build fails, or ``BNNSLIM_RUNTIME_FALLBACK=1`` is set, the runtime uses
an exact torch emulation instead and warns once (:class:`RuntimeFallbackWarning`).
``BNNSLIM_RUNTIME_ISA`` (``auto``, ``avx512``, ``avx2``, ``popcnt``, ``scalar``)
forces a kernel, for tests and benchmarks; forcing one the CPU lacks is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from bnnslim.errors import BnnslimError

ENV_FALLBACK = "BNNSLIM_RUNTIME_FALLBACK"
ENV_ISA = "BNNSLIM_RUNTIME_ISA"
ENV_CACHE = "BNNSLIM_CACHE_DIR"

SOURCE = Path(__file__).with_name("_kernels.cpp")
OPS_NAMESPACE = "bnnslim_rt"

#: kernel names as BNNSLIM_RUNTIME_ISA spells them -> the library's codes
ISA_CODES: dict[str, int] = {"auto": 0, "scalar": 1, "popcnt": 2, "avx2": 3, "avx512": 4}
EMULATION = "torch-emulation"
STALE_LOCK_SECONDS = 600  # a build takes 10-30 s; an older lock file is left from a killed build


class RuntimeFallbackWarning(UserWarning):
    """The fast kernels are not available; the runtime runs a (correct, slower) torch emulation."""


class ThreadsWarning(UserWarning):
    """More threads were asked for than there are CPU cores."""


@dataclass(frozen=True)
class KernelStatus:
    """What the runtime runs on this machine.

    ``isa`` is the kernel the library picked for this CPU (``avx512_vpopcntdq``,
    ``avx2``, ``popcnt`` or ``scalar``), or ``torch-emulation`` when the library
    is not available; ``reason`` then says why.
    """

    available: bool
    isa: str
    reason: str | None = None
    library: Path | None = None
    build_seconds: float | None = None

    @property
    def fast_popcount(self) -> bool:
        """True when the kernel has a vector popcount (AVX-512 VPOPCNTDQ or AVX2)."""
        return self.isa in ("avx512_vpopcntdq", "avx2")


_lock = threading.Lock()
_status: KernelStatus | None = None


def cache_dir() -> Path:
    """Where built kernels are kept: ``$BNNSLIM_CACHE_DIR`` or ``$XDG_CACHE_HOME/bnnslim`` or ``~/.cache/bnnslim``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "bnnslim"


def extension_name(source: Path = SOURCE) -> str:
    """The library's name: changes with the source, torch's version and Python's."""
    digest = hashlib.sha256(source.read_bytes())
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}|{sys.platform}".encode())
    return f"bnnslim_rt_{digest.hexdigest()[:16]}"


def _env_forces_fallback() -> bool:
    return os.environ.get(ENV_FALLBACK, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def _ninja_on_path() -> "contextlib.Generator[None, None, None]":
    # cpp_extension runs `ninja` from PATH; the `ninja` wheel's binary may not be
    # on PATH when the environment's python is run without activating it.
    try:
        import ninja  # type: ignore[import-not-found]

        bin_dir = str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = bin_dir + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


@contextlib.contextmanager
def _quiet_cpp_extension() -> "contextlib.Generator[None, None, None]":
    # cpp_extension logs "No CUDA runtime is found" on import on CUDA builds of
    # torch without a GPU; it has no bearing on a CPU-only extension.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _build(source: Path) -> KernelStatus:
    name = extension_name(source)
    build_dir = cache_dir() / "torch_extensions" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{name}.so"
    lock = build_dir / "lock"  # cpp_extension's build lock; a killed build leaves it behind
    with contextlib.suppress(OSError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()  # else every later process would wait on it forever
    started = time.perf_counter()
    with _quiet_cpp_extension(), _ninja_on_path():
        if library.exists() and not lock.exists():
            # built by an earlier process (and no build in progress): no compiler or ninja needed
            torch.ops.load_library(str(library))
        else:
            from torch.utils import cpp_extension

            cpp_extension.load(
                name=name,
                sources=[str(source)],
                extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
    seconds = time.perf_counter() - started
    isa = str(getattr(torch.ops, OPS_NAMESPACE).isa_name(0))
    return KernelStatus(available=True, isa=isa, library=library, build_seconds=seconds)


def _fail_reason(exc: BaseException) -> str:
    """One short line: the compiler's first ``error:`` line if there is one, else the exception's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    diagnostics = [line for line in lines if "error:" in line or "not found" in line]
    first = diagnostics[0] if diagnostics else (lines[0] if lines else type(exc).__name__)
    return f"{type(exc).__name__}: {first[:240]}"


def kernel_status() -> KernelStatus:
    """Build or load the kernels once per process; warn once if they are not available."""
    global _status
    with _lock:
        if _status is not None:
            return _status
        if _env_forces_fallback():
            status = KernelStatus(False, EMULATION, reason=f"{ENV_FALLBACK} is set")
        elif sys.byteorder != "little":
            status = KernelStatus(False, EMULATION, reason="the packed kernels assume a little-endian CPU")
        else:
            try:
                status = _build(SOURCE)
            except Exception as exc:  # noqa: BLE001 - any build failure means: fall back
                status = KernelStatus(False, EMULATION, reason=_fail_reason(exc))
        if not status.available:
            hint = "" if _env_forces_fallback() else (
                " Install a C++ compiler and ninja (pip install ninja), or set "
                f"{ENV_FALLBACK}=1 to choose the emulation and silence this warning.")
            warnings.warn(
                f"bnnslim runtime: the packed binary kernels are not available ({status.reason}); "
                f"binary layers run a correct but slow torch emulation.{hint}",
                RuntimeFallbackWarning, stacklevel=3)
        _status = status
        return status


def reset() -> None:
    """Forget the build result (tests use it to re-run the build or fallback logic)."""
    global _status
    with _lock:
        _status = None


def ops() -> object:
    """The library's ops (``torch.ops.bnnslim_rt``); raises when the kernels are not available."""
    status = kernel_status()
    if not status.available:
        raise BnnslimError(f"the packed binary kernels are not available ({status.reason})",
                           "use the emulation (PackedBinaryConv2d does so by itself)")
    return getattr(torch.ops, OPS_NAMESPACE)


def isa_code() -> int:
    """The kernel code to run: ``BNNSLIM_RUNTIME_ISA`` if set (checked against the CPU), else 0 (auto)."""
    name = os.environ.get(ENV_ISA, "auto").strip().lower() or "auto"
    if name not in ISA_CODES:
        raise BnnslimError(f"{ENV_ISA}={name} is not a kernel", f"use one of: {', '.join(ISA_CODES)}")
    code = ISA_CODES[name]
    if code and not bool(getattr(ops(), "cpu_has")(code)):
        raise BnnslimError(f"{ENV_ISA}={name}: this CPU lacks that instruction set",
                           f"unset {ENV_ISA} to let the runtime choose (this CPU: {kernel_status().isa})")
    return code


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    """The CPU's model name (with family and model numbers, which name the core generation under VMs)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" in fields:
        return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    import platform

    return platform.processor() or platform.machine()


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads (torch's pool, which the kernels share); warn above the core count."""
    if threads < 1:
        raise BnnslimError(f"--threads {threads} is not a thread count", "give 1 or more")
    cores = available_cores()
    if threads > cores:
        warnings.warn(
            f"--threads {threads} is above the {cores} CPU cores available: the extra threads only wait "
            "for a core and latency gets worse, not better", ThreadsWarning, stacklevel=2)
    torch.set_num_threads(threads)
    return threads
