"""Paired taps: binary convs with at most 32 input channels per group, two taps per 64-bit word (issue 13).

Such a layer fills only the low half of each packed word, so a 3x3 conv used to
popcount 9 half-empty words per output. The kernels now give the packed input a
second image whose word at column w holds columns w and w + 1, and read two taps
of a kernel row from one word (6 words for a 3x3, 15 for a 5x5; an odd last tap
from the first image). This times both paths on the same layers and on the slim
examples end to end: batch 1, one thread, interleaved rounds (the path switched
between rounds with the kernels' ``set_pair_taps``), each ISA in its own
process (``BNNSLIM_RUNTIME_ISA``). The runtime pairs taps with the AVX2 and
scalar kernels only; the AVX-512 rows force pairing on to show why not there.
AVX2's nibble-table kernel (runtime_avx2_kernels.py), which reads one tap per
word and runs most layers that write bits or channels-last floats, is switched
off here (``set_avx2_lut(0)``): the AVX2 rows time the pixel-lane kernel.

    python benchmarks/runtime_paired_taps.py       # writes runtime_paired_taps.md beside it
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import header, write_record  # noqa: E402

#: (name, in, out, kernel, stride, padding, groups, input size)
LAYERS = [
    ("ResNet-18 example at width 0.5, first stage: 32->32 3x3 at 32x32", 32, 32, 3, 1, 1, 1, 32),
    ("its first stride-2 conv: 32->64 3x3 stride 2 at 32x32", 32, 64, 3, 2, 1, 1, 32),
    ("VGG-11 example at width 0.5, second conv: 32->64 3x3 at 16x16", 32, 64, 3, 1, 1, 1, 16),
    ("a narrow network at 56x56: 16->16 3x3", 16, 16, 3, 1, 1, 1, 56),
    ("small CNN (Fashion-MNIST): 16->32 3x3 at 14x14", 16, 32, 3, 1, 1, 1, 14),
    ("a narrow 5x5: 24->48 5x5 at 16x16", 24, 48, 5, 1, 2, 1, 16),
    ("grouped (RegNetX-like, 16 per group): 64->64 3x3, 4 groups, at 16x16", 64, 64, 3, 1, 1, 4, 16),
    ("the same at stride 2", 64, 64, 3, 2, 1, 4, 16),
    ("grouped, 25 groups at 4x4: 400->400 3x3", 400, 400, 3, 1, 1, 25, 4),
]
NETWORKS = ["resnet18", "vgg11"]  # the slim examples of runtime_vs_peers.py
ISAS = ["avx512", "avx2"]


NEVER, AUTO, ALWAYS = 0, 1, 2  # the kernels' set_pair_taps modes


def ab_times(call: Callable[[], object], rounds: int, inner: int, paired_mode: int = ALWAYS) -> dict[str, float]:
    """Median seconds per call with (``paired_mode``) and without paired taps, and the median of per-round
    ratios."""
    from bnnslim.runtime import build

    ops = build.fast_ops()
    for mode in (paired_mode, NEVER):
        ops.set_pair_taps(mode)
        for _ in range(5):
            call()
    times: dict[int, list[float]] = {paired_mode: [], NEVER: []}
    for r in range(rounds):
        for mode in ((paired_mode, NEVER) if r % 2 == 0 else (NEVER, paired_mode)):
            ops.set_pair_taps(mode)
            start = time.perf_counter()
            for _ in range(inner):
                call()
            times[mode].append((time.perf_counter() - start) / inner)
    ops.set_pair_taps(AUTO)
    return {"paired": statistics.median(times[paired_mode]), "unpaired": statistics.median(times[NEVER]),
            "speedup": statistics.median(b / a for a, b in zip(times[paired_mode], times[NEVER], strict=True))}


def measure(rounds: int, inner: int) -> dict[str, object]:
    """This process's ISA: every layer and network, both paths."""
    from runtime_vs_peers import build_models
    from torch import nn

    from bnnslim.binary.layers import BinaryConv2d
    from bnnslim.plugins import get_scheme
    from bnnslim.runtime import build, kernel_status, set_threads, to_runtime
    from bnnslim.runtime.layers import PackedBinaryConv2d

    set_threads(1)
    build.fast_ops().set_avx2_lut(0)  # the pixel-lane kernel, which pairs taps (the docstring)
    torch.manual_seed(0)
    out: dict[str, object] = {"kernel": os.environ.get("BNNSLIM_RUNTIME_ISA") or kernel_status().isa, "layers": {},
                              "networks": {}}
    with torch.no_grad():
        for name, cin, cout, k, stride, padding, groups, size in LAYERS:
            conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=False)
            packed = PackedBinaryConv2d.from_binary_conv(BinaryConv2d.from_conv(conv, get_scheme("xnor")).eval())
            packed.mode = "kernel"
            x = torch.randn(1, cin, size, size).contiguous(memory_format=torch.channels_last)
            out["layers"][name] = ab_times(lambda p=packed, x=x: p(x), rounds, inner)  # type: ignore[index]
        for name in NETWORKS:
            _, binary, x = build_models(name)
            runtime = to_runtime(binary)
            out["networks"][name] = ab_times(lambda m=runtime, x=x: m(x), rounds, max(1, inner // 4))  # type: ignore[index]
    return out


def report(results: dict[str, dict], args: argparse.Namespace, seconds: float) -> str:
    lines = [header("Paired taps: two taps per 64-bit word for layers of at most 32 input channels (batch 1, "
                    "one thread)"),
             f"- {args.rounds} interleaved rounds x {args.inner} calls per path (networks: a quarter of that), "
             f"medians; speed-up = median of per-round ratios (unpaired / paired); {seconds:.0f} s", ""]
    for isa, r in results.items():
        lines += [f"\n## ISA: {isa} (kernel `{r['kernel']}`)\n",
                  "| layer or network | words per output (paired / one tap per word) | paired (us) | "
                  "one tap per word (us) | speed-up |", "|---|---|---|---|---|"]
        for name, _cin, _cout, k, *_ in LAYERS:
            t = r["layers"][name]
            lines.append(f"| {name} | {k * ((k + 1) // 2)} / {k * k} | {1e6 * t['paired']:.1f} | "
                         f"{1e6 * t['unpaired']:.1f} | {t['speedup']:.2f}x |")
        for name in NETWORKS:
            t = r["networks"][name]
            lines.append(f"| {name} example, slim (width 0.5), fused, end to end | | {1e6 * t['paired']:.1f} | "
                         f"{1e6 * t['unpaired']:.1f} | {t['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=200)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: measure one ISA, print JSON
    parser.add_argument("--out", type=Path, default=HERE / "runtime_paired_taps.md")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.rounds, args.inner)))
        return
    from bnnslim.runtime import build

    ops = build.ops()
    start = time.perf_counter()
    results: dict[str, dict] = {}
    for isa in ISAS:
        if not bool(ops.cpu_has(build.ISA_CODES[isa])):
            continue
        env = {**os.environ, build.ENV_ISA: isa, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, __file__, "--worker", isa, "--rounds", str(args.rounds),
                               "--inner", str(args.inner)], env=env, capture_output=True, text=True, check=True)
        results[isa] = json.loads(done.stdout.strip().splitlines()[-1])
    text = report(results, args, time.perf_counter() - start)
    write_record(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
