"""Build the runtime's C++ kernels once, pick the instruction set, or fall back.

The kernels (``_kernels.cpp``) are compiled on first use with
``torch.utils.cpp_extension.load`` (a C++ compiler; with ninja where installed,
else one direct compiler call) into
``$BNNSLIM_CACHE_DIR/torch_extensions/<name>`` (default ``~/.cache/bnnslim``),
where ``<name>`` hashes the source, torch's version and Python's, so an edited
source or another torch builds afresh and every later process loads the cached
library in well under a second. The build uses baseline x86-64 flags: the
AVX-512 and AVX2 functions carry their own target attributes and the library
picks one at run time (``__builtin_cpu_supports``), so one build serves any CPU.
Flags are per platform (:func:`compiler_flags`). A build prints one line on
stderr when it starts (with the cache folder), one every 20 s while it runs and
one when it ends; later processes load the cached library silently.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
_module: object | None = None  # the library as a Python module (pybind11 functions)
_isa_checked: dict[str, int] = {}  # BNNSLIM_RUNTIME_ISA value -> code, checked against the CPU once


def cache_dir() -> Path:
    """Where built kernels are kept: ``$BNNSLIM_CACHE_DIR`` or ``$XDG_CACHE_HOME/bnnslim`` or ``~/.cache/bnnslim``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "bnnslim"


def extension_name(source: Path = SOURCE) -> str:
    """The library's name: changes with the source, torch's version and Python's."""
    digest = hashlib.sha256(source.read_bytes())
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}|{sys.platform}|{compiler_flags()}".encode())
    return f"bnnslim_rt_{digest.hexdigest()[:16]}"


def _env_forces_fallback() -> bool:
    return os.environ.get(ENV_FALLBACK, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    # cpp_extension runs `ninja` from PATH; the `ninja` wheel's binary may not be
    # on PATH when the environment's python is run without activating it.
    try:
        import ninja

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
def _quiet_cpp_extension() -> Iterator[None]:
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


def _libomp_prefix() -> Path | None:
    """Homebrew's libomp (Apple clang has no OpenMP runtime of its own), or None."""
    for prefix in (os.environ.get("LIBOMP_PREFIX", ""), "/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"):
        if prefix and (Path(prefix) / "include" / "omp.h").is_file():
            return Path(prefix)
    return None


def compiler_flags(platform: str = sys.platform) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for this platform's compiler.

    GCC/Clang on Linux: ``-O3 -fopenmp``; MSVC: ``/O2 /openmp`` (it builds the
    portable scalar kernel only: the SIMD paths need GCC/Clang attributes);
    Apple clang: OpenMP only where Homebrew's libomp is found (else the kernels
    run on one thread). ``-ffp-contract=off`` keeps ``count * alpha + bias`` a
    multiply then an add, as torch's emulation computes it.
    """
    if platform == "win32":
        return ["/O2", "/openmp", "/fp:strict", "/std:c++20"], []
    if platform == "darwin":
        omp = _libomp_prefix()
        if omp is None:
            return ["-O3", "-ffp-contract=off"], []
        return (["-O3", "-ffp-contract=off", "-Xpreprocessor", "-fopenmp", f"-I{omp / 'include'}"],
                [f"-L{omp / 'lib'}", "-lomp"])
    return ["-O3", "-fopenmp", "-ffp-contract=off"], ["-fopenmp"]


def _ninja_available() -> bool:
    from torch.utils import cpp_extension

    try:
        return bool(cpp_extension.is_ninja_available())
    except Exception:
        return False


def _compile_without_ninja(name: str, source: Path, build_dir: Path, cflags: list[str], ldflags: list[str]) -> Path:
    """Compile and link the library with one compiler call (GCC/Clang; what cpp_extension does with ninja)."""
    import subprocess
    import sysconfig

    from torch.utils import cpp_extension

    if sys.platform == "win32":
        raise RuntimeError("ninja not found: building without ninja needs GCC or Clang (pip install ninja)")
    compiler = os.environ.get("CXX", "c++")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    target = build_dir / f"{name}.so"
    partial = build_dir / f"{name}.so.partial"
    cmd = [compiler, "-shared", "-fPIC", "-std=c++20", *cflags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *(f"-I{p}" for p in cpp_extension.include_paths()), f"-I{sysconfig.get_paths()['include']}",
           str(source), "-o", str(partial),
           *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python",
           *ldflags]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{compiler} failed: {done.stderr.strip() or done.stdout.strip()}")
    partial.replace(target)  # atomic: another process sees the whole library or none
    return target


class _Progress:
    """One line on stderr when a build starts, a line every ``every`` seconds while it runs, one when done."""

    def __init__(self, where: Path, every: float = 20.0) -> None:
        self.where, self.every = where, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._started = time.perf_counter()

    def _say(self, text: str) -> None:
        print(f"bnnslim: {text}", file=sys.stderr, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self._say(f"still compiling the packed kernels ({time.perf_counter() - self._started:.0f} s)")

    def __enter__(self) -> _Progress:
        self._say(f"compiling the packed binary kernels once for this torch (about a minute, longer on a "
                  f"busy machine); cached in {self.where}")
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        seconds = time.perf_counter() - self._started
        self._say(f"kernels {'built' if exc_type is None else 'failed to build'} in {seconds:.0f} s")


def _import_library(name: str, library: Path) -> object:
    """Load the built library as a Python module (which registers torch.ops.bnnslim_rt too)."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.ExtensionFileLoader(name, str(library))
    spec = importlib.util.spec_from_file_location(name, str(library), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


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
            module = _import_library(name, library)
        else:
            cflags, ldflags = compiler_flags()
            with _Progress(build_dir) if not library.exists() else contextlib.nullcontext():
                if _ninja_available() and not os.environ.get("BNNSLIM_NO_NINJA"):
                    from torch.utils import cpp_extension

                    module = cpp_extension.load(name=name, sources=[str(source)], extra_cflags=cflags,
                                                extra_ldflags=ldflags, build_directory=str(build_dir),
                                                is_python_module=True, verbose=False)
                else:
                    module = _import_library(name, _compile_without_ninja(name, source, build_dir, cflags, ldflags))
    global _module
    _module = module
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
            except Exception as exc:
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
        _isa_checked.clear()


def ops() -> Any:
    """The library's ops (``torch.ops.bnnslim_rt``); raises when the kernels are not available."""
    status = kernel_status()
    if not status.available:
        raise BnnslimError(f"the packed binary kernels are not available ({status.reason})",
                           "use the emulation (PackedBinaryConv2d does so by itself)")
    return getattr(torch.ops, OPS_NAMESPACE)


def fast_ops() -> Any:
    """The same ops as :func:`ops`, called through pybind11 (a few microseconds less per call)."""
    ops()  # builds, or raises when the kernels are not available
    return _module


def available_ops() -> Any | None:
    """The pybind ops when the kernels are available (built on first use), else None: the hot paths' check,
    without the lock and lookups of :func:`fast_ops`."""
    status = _status if _status is not None else kernel_status()
    return _module if status.available else None


def vector_kernels(code: int) -> bool:
    """Whether the kernel ``code`` (from :func:`isa_code`: forced, or 0 for the one chosen for this CPU) has
    vector tiles (AVX2 or AVX-512), which float kernels need to beat torch."""
    if code:
        return code >= ISA_CODES["avx2"]
    status = _status if _status is not None else kernel_status()
    return status.isa in ("avx2", "avx512_vpopcntdq")


#: os.environ's own mapping and BNNSLIM_RUNTIME_ISA's key in it (CPython's ``os._Environ``), for
#: :func:`env_isa`; None where os.environ is another kind of mapping
_ENVIRON: dict[Any, Any] | None = getattr(os.environ, "_data", None)
_ENV_ISA_KEY: object = getattr(os.environ, "encodekey", lambda k: k)(ENV_ISA)


def env_isa() -> str | None:
    """``BNNSLIM_RUNTIME_ISA`` as set now, or None. Read on every batch-1 call of every packed sequence, block and
    layer (plans depend on it): ``os.environ.get`` of a missing variable costs 0.7 us (it raises and catches a
    KeyError inside), a lookup in os.environ's own dict some 50 ns; both see ``os.environ[...] = ...`` at once."""
    if _ENVIRON is None:
        return os.environ.get(ENV_ISA)
    raw = _ENVIRON.get(_ENV_ISA_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def isa_code() -> int:
    """The kernel code to run: ``BNNSLIM_RUNTIME_ISA`` if set (checked against the CPU), else 0 (auto)."""
    name = (env_isa() or "auto").strip().lower() or "auto"
    if name in _isa_checked:
        return _isa_checked[name]
    if name not in ISA_CODES:
        raise BnnslimError(f"{ENV_ISA}={name} is not a kernel", f"use one of: {', '.join(ISA_CODES)}")
    code = ISA_CODES[name]
    if code and not bool(ops().cpu_has(code)):
        raise BnnslimError(f"{ENV_ISA}={name}: this CPU lacks that instruction set",
                           f"unset {ENV_ISA} to let the runtime choose (this CPU: {kernel_status().isa})")
    _isa_checked[name] = code
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
