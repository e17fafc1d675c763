"""The benchmarks' AVX2-only CPU (``benchmarks/cpuid_without_avx512.c``): every engine in the masked process sees
no AVX-512, and the process otherwise behaves as before (a real crash still reaches the program's own handler).

Runs only where the mask can be had: an AVX-512 CPU whose kernel offers CPUID faulting, and a C compiler.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from _common import without_avx512_env


@pytest.fixture(scope="module")
def mask_env() -> dict[str, str]:
    """LD_PRELOAD of the built mask (built and checked once, when a test here first runs)."""
    env, why_not = without_avx512_env()
    if why_not:
        pytest.skip(f"no CPUID mask here: {why_not}")
    return env


def run_masked(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


def test_the_runtime_and_torch_pick_their_avx2_code_under_the_mask(mask_env: dict[str, str]) -> None:
    done = run_masked("import torch; from bnnslim.runtime import kernel_status; "
                      "print(kernel_status().isa, torch.backends.cpu.get_cpu_capability())", mask_env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["avx2", "AVX2"]


#: x86-64 code for ``uint32_t f(void)``: CPUID leaf 7, subleaf 0, returns EBX (bit 16: AVX512F)
CPUID_LEAF7_EBX = ("import ctypes, mmap\n"
                   "code = bytes([0x53, 0xb8, 7, 0, 0, 0, 0x31, 0xc9, 0x0f, 0xa2, 0x89, 0xd8, 0x5b, 0xc3])\n"
                   "page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
                   "page.write(code)\n"
                   "address = ctypes.addressof(ctypes.c_char.from_buffer(page))\n"
                   "leaf7_ebx = ctypes.CFUNCTYPE(ctypes.c_uint32)(address)\n")


def test_cpuid_hides_avx512_even_after_the_program_installs_its_own_crash_handler(mask_env: dict[str, str]) -> None:
    # faulthandler installs its SIGSEGV handler after the mask's, which answers each CPUID from that signal
    done = run_masked(CPUID_LEAF7_EBX + "import faulthandler; faulthandler.enable()\n"
                      "print((leaf7_ebx() >> 16) & 1, (leaf7_ebx() >> 5) & 1)", mask_env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "1"]  # AVX512F hidden, AVX2 kept


def test_a_real_crash_still_reaches_the_programs_own_handler(mask_env: dict[str, str]) -> None:
    done = run_masked("import faulthandler, ctypes; faulthandler.enable(); ctypes.string_at(0)", mask_env)
    assert done.returncode == -11
    assert "Fatal Python error: Segmentation fault" in done.stderr


@pytest.mark.slow
def test_a_benchmark_run_without_avx512_says_so_in_its_record(mask_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "runtime_torchvision.py"), "--models",
                           "resnet18", "--rounds", "1", "--inner", "1", "--without-avx512", "--out", str(out)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "AVX2 only, CPUID masked" in text
    assert "packed kernel: `avx2`" in text
