"""AVX2's two conv kernels side by side: nibble tables with output channels in the lanes vs pixel lanes (issue 13).

With AVX2 (no vector popcount) a binary conv that writes packed bits for the next
one, or channels-last floats, runs by default on nibble tables: for each input
nibble (4 channels' sign and nonzero bits) a 16-byte table holds the count for
every weight nibble, and one ``pshufb`` with 32 output channels' weight nibbles as
the index, plus one add, counts those 32 channels. The other kernel puts 4 output
pixels in the lanes and counts ``popcount(s ^ w)`` per output channel by nibble
lookups, then sums bytes across each lane and shuffles the compares into bytes.
This times both on single layers of the examples' shapes (reading packed bits, as
a layer inside a fused chain does; writing bits, or floats where a residual add
or a real layer follows) and on the slim examples end to end: batch 1, one
thread, AVX2 (``BNNSLIM_RUNTIME_ISA=avx2``), interleaved rounds, the kernel
switched with the kernels' ``set_avx2_lut`` (2: nibble tables wherever they can
run, 0: never; the default, 1, leaves layers of at most 16 outputs to the other).

    python benchmarks/runtime_avx2_kernels.py     # writes runtime_avx2_kernels.md beside it
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
from _common import header, interleaved_times, write_record  # noqa: E402

#: (name, in, out, kernel, stride, padding, input size, output): "bits" (thresholds, a fused chain's inner
#: layer) or "floats" (channels-last, before a residual add or a real layer)
LAYERS = [
    ("NIN: 96->80 1x1 at 32x32", 96, 80, 1, 1, 0, 32, "bits"),
    ("NIN: 80->48 1x1 at 32x32", 80, 48, 1, 1, 0, 32, "bits"),
    ("NIN: 48->96 5x5 at 16x16", 48, 96, 5, 1, 2, 16, "bits"),
    ("NIN: 96->96 1x1 at 16x16", 96, 96, 1, 1, 0, 16, "bits"),
    ("NIN: 96->96 3x3 at 8x8", 96, 96, 3, 1, 1, 8, "bits"),
    ("128->128 3x3 at 16x16", 128, 128, 3, 1, 1, 16, "bits"),
    ("256->256 3x3 at 8x8", 256, 256, 3, 1, 1, 8, "bits"),
    ("VGG-11: 256->256 3x3 at 2x2", 256, 256, 3, 1, 1, 2, "bits"),
    ("ResNet-18 at width 0.5: 32->32 3x3 at 32x32 (paired taps in the other kernel)", 32, 32, 3, 1, 1, 32,
     "floats"),
    ("ResNet-18 at width 0.5: 64->128 3x3 stride 2 at 16x16", 64, 128, 3, 2, 1, 16, "floats"),
    ("ResNet-18 at width 0.5: 64->128 1x1 stride 2 shortcut at 16x16", 64, 128, 1, 2, 0, 16, "floats"),
    ("a narrow layer: 16->16 3x3 at 32x32 (not by default: 16 outputs)", 16, 16, 3, 1, 1, 32, "bits"),
    ("few inputs: 8->64 3x3 at 32x32", 8, 64, 3, 1, 1, 32, "bits"),
]
NETWORKS = ["nin", "vgg11", "resnet18"]  # the slim examples of runtime_vs_peers.py
TABLES, PIXELS = 2, 0  # set_avx2_lut modes: nibble tables wherever they run / never


def with_kernel(mode: int, call: Callable[[], object]) -> Callable[[], object]:
    from bnnslim.runtime import build

    ops = build.fast_ops()

    def run() -> object:
        ops.set_avx2_lut(mode)
        return call()

    return run


def ab(call: Callable[[], object], rounds: int, inner: int) -> dict[str, float]:
    """Median seconds per call on each kernel and the median of per-round ratios (pixel lanes / tables)."""
    times = interleaved_times({"tables": with_kernel(TABLES, call), "pixels": with_kernel(PIXELS, call)}, rounds,
                              inner)
    return {"tables": statistics.median(times["tables"]), "pixels": statistics.median(times["pixels"]),
            "speedup": statistics.median(p / t for t, p in zip(times["tables"], times["pixels"], strict=True))}


def measure(rounds: int, inner: int) -> dict[str, object]:
    """Every layer and network on both kernels (this process runs AVX2)."""
    from runtime_vs_peers import build_models
    from torch import nn

    from bnnslim.binary.layers import BinaryConv2d
    from bnnslim.plugins import get_scheme
    from bnnslim.runtime import set_threads, to_runtime
    from bnnslim.runtime.bits import pack_ternary
    from bnnslim.runtime.layers import PackedBinaryConv2d

    set_threads(1)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, dict[str, float]]] = {"layers": {}, "networks": {}}
    with torch.no_grad():
        for name, cin, cout, k, stride, padding, size, output in LAYERS:
            conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
            packed = PackedBinaryConv2d.from_binary_conv(BinaryConv2d.from_conv(conv, get_scheme("xnor")).eval())
            packed.mode = "kernel"
            packed.input_bits = True
            if output == "bits":  # about half the outputs fire: thresholds near a dot product's middle
                low = torch.randint(-4, 5, (cout,), generator=gen, dtype=torch.int32)
                packed.out_thresholds = torch.stack([low, low + 1, torch.zeros_like(low)], dim=1)
            bits = pack_ternary(torch.randint(0, 2, (1, cin, size, size), generator=gen).float() * 2 - 1)
            out["layers"][name] = ab(lambda p=packed, b=bits: p(b), rounds, inner)
        for name in NETWORKS:
            _, binary, x = build_models(name)
            runtime = to_runtime(binary)
            out["networks"][name] = ab(lambda m=runtime, x=x: m(x), rounds, max(1, inner // 10))
    return out


def report(r: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace, seconds: float) -> str:
    lines = [header("AVX2 conv kernels: nibble tables (output channels in the lanes) vs pixel lanes (batch 1, one "
                    "thread)"),
             f"- {args.rounds} interleaved rounds x {args.inner} calls per kernel (networks: a tenth of that), "
             f"medians; speed-up = median of per-round ratios (pixel lanes / nibble tables); {seconds:.0f} s",
             "- layers read packed bits (a fused chain's input) and write bits (thresholds) or channels-last floats",
             "", "| layer or network | output | nibble tables (us) | pixel lanes (us) | speed-up |",
             "|---|---|---|---|---|"]
    for name, *_, output in LAYERS:
        t = r["layers"][name]
        lines.append(f"| {name} | {output} | {1e6 * t['tables']:.1f} | {1e6 * t['pixels']:.1f} | "
                     f"{t['speedup']:.2f}x |")
    for name in NETWORKS:
        t = r["networks"][name]
        lines.append(f"| {name} example, slim (width 0.5), fused, end to end | | {1e6 * t['tables']:.1f} | "
                     f"{1e6 * t['pixels']:.1f} | {t['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=200)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: measure, print JSON
    parser.add_argument("--out", type=Path, default=HERE / "runtime_avx2_kernels.md")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.rounds, args.inner)))
        return
    from bnnslim.runtime import build

    if not bool(build.ops().cpu_has(build.ISA_CODES["avx2"])):
        raise SystemExit("runtime_avx2_kernels: this CPU cannot run the AVX2 kernels")
    start = time.perf_counter()
    env = {**os.environ, build.ENV_ISA: "avx2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--worker", "--rounds", str(args.rounds), "--inner",
                           str(args.inner)], env=env, capture_output=True, text=True, check=True)
    text = report(json.loads(done.stdout.strip().splitlines()[-1]), args, time.perf_counter() - start)
    write_record(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
