"""Per-layer latency: bnnslim's packed binary conv vs torch's float conv2d of the same shape.

For each binary 3x3 conv layer (stride 1, padding 1) of a ResNet-style network,
at batch 1 and one thread by default, times

* torch ``F.conv2d`` in float32 (the float original of the layer),
* the runtime's ``PackedBinaryConv2d`` forward (float NCHW in, float NCHW out:
  sign-and-pack of the input included), with the best kernel for this CPU and
  optionally the slower kernels forced (``--isa avx2 scalar``),
* torch's emulation of the binary layer (``BinaryConv2d`` forward), for reference;

and then the example networks end to end (``--examples``).

The candidates run round-robin: each round times every candidate (``--inner``
calls each, after warm-up), the ratio float / runtime is taken within the round,
and the report gives the median over ``--rounds`` rounds, so that load from
other processes on a shared machine hits both sides of a ratio alike.

    python benchmarks/runtime_layers.py --out benchmarks/runtime_layers.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_record

from bnnslim.binary.layers import BinaryConv2d
from bnnslim.default_plugins.schemes import bnnslim_schemes
from bnnslim.runtime import PackedBinaryConv2d, build, cpu_flags, cpu_model, kernel_status, set_threads

SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FLAGS_OF_INTEREST = ["popcnt", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vpopcntdq",
                     "avx512_bitalg", "avx512_vnni"]
ISA_LABEL = {"avx512": "AVX-512 VPOPCNTDQ", "avx2": "AVX2 (pshufb popcount)", "popcnt": "scalar POPCNT",
             "scalar": "scalar (no POPCNT)"}


def timed(fn: Callable[[], object], inner: int) -> float:
    """Seconds per call of ``inner`` calls (0.0 for none: a warm-up of 0 calls)."""
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / max(inner, 1)


def with_isa(isa: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        os.environ[build.ENV_ISA] = isa
        try:
            return fn()
        finally:
            os.environ.pop(build.ENV_ISA, None)
    return run


def bench_layer(channels: int, size: int, batch: int, isas: list[str], rounds: int, inner: int,
                warmup: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    xnor = next(s for s in bnnslim_schemes() if s.name == "xnor")
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
    binary = BinaryConv2d.from_conv(conv, xnor).eval()
    packed = PackedBinaryConv2d.from_binary_conv(binary)
    x = torch.randn(batch, channels, size, size)
    w, b = conv.weight.detach(), conv.bias.detach()  # type: ignore[union-attr]
    with torch.no_grad():
        reference = binary(x)
    candidates: dict[str, Callable[[], object]] = {"float": lambda: F.conv2d(x, w, b, 1, 1)}
    for isa in isas:
        run = with_isa(isa, lambda: packed(x))
        got = run()
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-3)  # a fast wrong answer is no answer
        candidates[isa] = run

    def emulation() -> object:
        with torch.no_grad():
            return binary(x)

    candidates["emulation"] = emulation
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        timed(fn, warmup)
    for _ in range(rounds):
        for name, fn in candidates.items():
            times[name].append(timed(fn, inner))
    return times


def bench_example(name: str, rounds: int, inner: int, warmup: int) -> dict[str, list[float]]:
    """Whole example network (full width, not slimmed) at batch 1: float original vs binarized runtime."""
    import copy
    import importlib.util

    from bnnslim.binary.convert import apply_binarization, plan_binarization
    from bnnslim.runtime import to_runtime, with_emulation

    torch.manual_seed(0)
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.build_model().eval()
    x = torch.randn(1, *example.INPUT_SHAPE)
    float_nchw = copy.deepcopy(model)
    float_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xnor = next(s for s in bnnslim_schemes() if s.name == "xnor")
    apply_binarization(model, plan_binarization(model, x).binary, xnor)
    runtime = to_runtime(model)
    with torch.no_grad():  # the packed model's torch emulation gives the same numbers, bit for bit
        assert torch.equal(runtime(x), with_emulation(runtime)(x))
    candidates: dict[str, Callable[[], object]] = {
        "float": lambda: float_nchw(x),
        "float_cl": lambda: float_cl(x.contiguous(memory_format=torch.channels_last)),
        "runtime": lambda: runtime(x),
    }
    times: dict[str, list[float]] = {k: [] for k in candidates}
    with torch.no_grad():
        for fn in candidates.values():
            timed(fn, warmup)
        for _ in range(rounds):
            for k, fn in candidates.items():
                times[k].append(timed(fn, inner))
    return times


def report(args: argparse.Namespace, results: dict[tuple[int, int], dict[str, list[float]]], isas: list[str],
           command: str, examples: dict[str, dict[str, list[float]]]) -> str:
    status = kernel_status()
    flags = cpu_flags()
    lines = [
        "# Binary conv layer latency: packed runtime vs torch float conv2d",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs, {platform.machine()})",
        f"- CPU flags: {', '.join(f for f in FLAGS_OF_INTEREST if f in flags) or 'unknown'}"
        f" (absent: {', '.join(f for f in FLAGS_OF_INTEREST if f not in flags) or 'none'})",
        f"- torch {torch.__version__}, threads: {torch.get_num_threads()}, batch {args.batch}",
        f"- runtime kernel chosen for this CPU: `{status.isa}`"
        + (f" (library built/loaded in {status.build_seconds:.1f} s)" if status.build_seconds else ""),
        f"- each layer: 3x3 conv, stride 1, padding 1, C in = C out, with bias; the runtime also applies alpha; "
        f"{args.rounds} rounds x {args.inner} calls after {args.warmup} warm-up calls; median over rounds",
        "",
        "## Speed-up over torch float conv2d (median of per-round ratios)",
        "",
    ]
    header = ["layer"] + [f"runtime {ISA_LABEL[i]}" for i in isas] + ["torch binary emulation"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (c, s), times in results.items():
        row = [f"{c} ch, {s}x{s}"]
        for name in [*isas, "emulation"]:
            ratios = [f / t for f, t in zip(times["float"], times[name], strict=True)]
            row.append(f"{statistics.median(ratios):.1f}x")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Median latency per call (ms; absolute times vary with the machine's load)", ""]
    header = ["layer", "torch float conv2d"] + [f"runtime {i}" for i in isas] + ["torch binary emulation"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (c, s), times in results.items():
        row = [f"{c} ch, {s}x{s}"] + [f"{statistics.median(times[n]) * 1e3:.3f}" for n in
                                      ["float", *isas, "emulation"]]
        lines.append("| " + " | ".join(row) + " |")
    if examples:
        lines += ["", "## Whole example networks, batch 1 (informative: full width, not slimmed)", "",
                  "Binarized with the `xnor` scheme (first and last layers real) and converted with "
                  "`bnnslim.runtime.to_runtime` (channels-last). Ratios: float original / runtime, the float "
                  "original run as built (NCHW) and converted to channels-last.", "",
                  "| network | vs float NCHW | vs float channels-last | float NCHW ms | float channels-last ms "
                  "| runtime ms |", "|---|---|---|---|---|---|"]
        for name, t in examples.items():
            r1 = statistics.median([f / r for f, r in zip(t["float"], t["runtime"], strict=True)])
            r2 = statistics.median([f / r for f, r in zip(t["float_cl"], t["runtime"], strict=True)])
            lines.append(f"| {name} | {r1:.1f}x | {r2:.1f}x | {statistics.median(t['float']) * 1e3:.2f} | "
                         f"{statistics.median(t['float_cl']) * 1e3:.2f} | "
                         f"{statistics.median(t['runtime']) * 1e3:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--isa", nargs="*", default=None,
                        help="kernels to time (avx512 avx2 popcnt scalar); default: the best one and avx2 if different")
    parser.add_argument("--examples", nargs="*", default=["nin", "vgg11", "resnet18"],
                        help="example networks to time end to end (none: --examples)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    status = kernel_status()
    if not status.available:
        sys.exit(f"the runtime kernels are not available here: {status.reason}")
    ops = build.ops()
    supported = [i for i in ("avx512", "avx2", "popcnt", "scalar") if ops.cpu_has(build.ISA_CODES[i])]  # type: ignore[attr-defined]
    wanted = set(args.isa) if args.isa is not None else {supported[0], "avx2"}
    unknown = wanted - set(build.ISA_CODES)
    if unknown:
        sys.exit(f"unknown kernel(s): {', '.join(sorted(unknown))}; choose from avx512 avx2 popcnt scalar")
    isas = [i for i in supported if i in wanted]
    if not status.fast_popcount:
        print(f"warning: this CPU has no vector popcount (kernel: {status.isa}); expect small speed-ups",
              file=sys.stderr)
    results = {}
    for c, s in SHAPES:
        results[(c, s)] = bench_layer(c, s, args.batch, isas, args.rounds, args.inner, args.warmup)
        print(f"{c} ch {s}x{s}: done", file=sys.stderr)
    examples = {}
    for name in args.examples:
        examples[name] = bench_example(name, args.rounds, max(1, args.inner // 4), max(1, args.warmup // 2))
        print(f"{name}: done", file=sys.stderr)
    command = "python " + " ".join([str(Path(sys.argv[0]).as_posix()), *(argv if argv is not None else sys.argv[1:])])
    text = report(args, results, isas, command, examples)
    print(text)
    if args.out is not None:
        write_record(args.out, text)


if __name__ == "__main__":
    main()
