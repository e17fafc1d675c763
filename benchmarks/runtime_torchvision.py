"""Torchvision classifiers binarized by bnnslim, on the packed runtime vs torch fp32 (issue 13), batch 1, one thread.

For each model (random weights: latency does not depend on them), at 3x64x64:
binarize as ``bnnslim binarize`` does (every conv binary but the first and the
last), convert to the packed runtime (fused chains), run the plan step
(:func:`bnnslim.runtime.plan_runtime`: each binary conv timed packed and as a
float conv on its input; unfused layers where float wins run float), then time
the float original (as built, NCHW) and the packed model in interleaved rounds.
Per layer: the plan's packed and float times of every binary conv (the float
conv of the same shape is what the original runs there).

    python benchmarks/runtime_torchvision.py      # writes runtime_torchvision.md beside it

``--without-avx512`` runs it on this CPU with AVX-512 hidden from bnnslim and
torch alike (``cpuid_without_avx512.c``): what an AVX2-only CPU would run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import header, interleaved_times, rerun_without_avx512, write_record  # noqa: E402

from bnnslim.bench import per_layer_times  # noqa: E402
from bnnslim.binary.convert import apply_binarization, plan_binarization  # noqa: E402
from bnnslim.plugins import get_scheme  # noqa: E402
from bnnslim.runtime import (  # noqa: E402
    PackedBinaryConv2d,
    cpu_flags,
    cpu_model,
    kernel_status,
    plan_runtime,
    runtime_plan,
    set_threads,
    to_runtime,
)

#: the issue's five, then architectures nobody tuned the runtime for: dense concatenation, grouped convs,
#: inception branches with functional activations, channel shuffles with depthwise convs
MODELS = ["resnet18", "resnet50", "vgg11_bn", "alexnet", "squeezenet1_0", "resnet34", "densenet121",
          "regnet_x_400mf", "googlenet", "shufflenet_v2_x1_0"]
TARGET = 3.0


def measure(name: str, size: int, rounds: int, inner: int) -> dict[str, object]:
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None, num_classes=1000).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    binary = getattr(torchvision.models, name)(weights=None, num_classes=1000).eval()
    binary.load_state_dict(original.state_dict())
    plan = plan_binarization(binary, x)
    apply_binarization(binary, plan.binary, get_scheme("xnor"))
    packed = to_runtime(binary.eval())
    choices = plan_runtime(packed, x)
    rplan = runtime_plan(packed)
    with torch.no_grad():
        times = interleaved_times({"float": partial(original, x), "packed": partial(packed, x)}, rounds, inner)
    ratio = statistics.median(a / b for a, b in zip(times["float"], times["packed"], strict=True))
    layer_s = per_layer_times({"packed": packed}, x, inner)["packed"]
    modules = dict(packed.named_modules())  # timed: binary convs and the real convs and linears, wherever folded
    real_s = sum(t for n, t in layer_s.items() if not isinstance(modules[n], PackedBinaryConv2d))
    packed_layers = [c for c in choices if c.runs == "packed"]
    slowest = min(packed_layers, key=lambda c: c.speedup) if packed_layers else None
    return {"ratio": ratio, "float_ms": statistics.median(times["float"]) * 1e3,
            "packed_ms": statistics.median(times["packed"]) * 1e3, "binary": len(choices),
            "real_share": real_s / statistics.median(times["packed"]),
            "fused": len(rplan.fused), "to_float": [c.layer for c in choices if c.runs == "float"],
            "slowest": slowest, "slower_than_float": [c for c in packed_layers if c.speedup < 1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "runtime_torchvision.md")
    parser.add_argument("--without-avx512", action="store_true",
                        help="run on this CPU with AVX-512 and VNNI hidden from bnnslim and torch alike (CPUID "
                             "masked: an AVX2-only CPU of this microarchitecture)")
    args = parser.parse_args(argv)
    if args.without_avx512:
        rerun_without_avx512(argv)
    warnings.simplefilter("ignore")
    set_threads(1)
    started, load = time.perf_counter(), os.getloadavg()[0]
    results = {}
    for name in args.models:
        results[name] = measure(name, args.size, args.rounds, args.inner)
        print(f"{name}: done", file=sys.stderr)
    isa = os.environ.get("BNNSLIM_RUNTIME_ISA") or kernel_status().isa
    flags = cpu_flags()
    shown_flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_vpopcntdq") if f in flags)
    lines = [header(f"Torchvision classifiers binarized by bnnslim: packed runtime vs torch fp32 "
                    f"({args.size}x{args.size}, batch 1, one thread)"),
             f"- CPU: {cpu_model()}; flags: {shown_flags}; packed kernel: `{isa}`",
             f"- {args.rounds} interleaved rounds x {args.inner} calls; medians of per-round ratios; load average "
             f"(1 min) at start {load:.1f}, at end {os.getloadavg()[0]:.1f} (shared 2-core VM); "
             f"{time.perf_counter() - started:.0f} s",
             "- per layer: the plan step's times of each binary conv, packed and as a float conv of the same shape",
             "", f"| model | float ms | packed ms | speed-up (target {TARGET:g}x) | binary convs | fused | run float "
             "(plan) | slowest packed layer (packed vs float) | packed layers slower than float | real convs and "
             "linears' share of the packed time (hooks, a separate pass) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        slow = r["slowest"]
        slow_txt = "-" if slow is None else f"`{slow.layer}` {slow.speedup:.2f}x ({slow.why})"
        lines.append(f"| {name} | {r['float_ms']:.2f} | {r['packed_ms']:.2f} | {r['ratio']:.1f}x"
                     f"{'' if r['ratio'] >= TARGET else ' (missed)'} | {r['binary']} | {r['fused']} | "
                     f"{len(r['to_float'])} | {slow_txt} | {len(r['slower_than_float'])} | "
                     f"{min(r['real_share'], 1.0):.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_record(args.out, text)


if __name__ == "__main__":
    main()
