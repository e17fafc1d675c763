"""Blocks with their own forward, planned vs as written, in the packed runtime (issue 13), batch 1, one thread.

``to_runtime`` gives every block with a forward of its own (ResNet's
``BasicBlock``, GoogLeNet's ``BasicConv2d`` and inceptions) a planned graph
(:mod:`bnnslim.runtime.blocks`). This times each model packed with those plans
and the same packed model with the blocks' own forwards (what the runtime ran
before), in interleaved rounds, and torch fp32 of the float model as the
reference a user starts from. Models: the ResNet-18 example at width 0.5
(3x32x32) and torchvision's ResNet-18 and GoogLeNet at 64x64, binarized with
the xnor scheme (random weights: latency does not depend on them).

    python benchmarks/runtime_planned_blocks.py      # writes runtime_planned_blocks.md beside it
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import warnings
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import header, interleaved_times, write_record  # noqa: E402

from bnnslim.binary.convert import apply_binarization, plan_binarization  # noqa: E402
from bnnslim.plugins import get_scheme  # noqa: E402
from bnnslim.runtime import cpu_flags, kernel_status, set_threads, to_runtime  # noqa: E402
from bnnslim.runtime.blocks import BlockForward  # noqa: E402


def models(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(float model, its binarized copy, input) for one benchmark model."""
    torch.manual_seed(0)
    if name == "resnet18 example":
        spec = importlib.util.spec_from_file_location("example_resnet18", HERE.parent / "examples" / "resnet18.py")
        assert spec is not None and spec.loader is not None
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        float_model = example.build_model(width=0.5).eval()
        x = torch.randn(1, *example.INPUT_SHAPE)
    else:
        kwargs = {"init_weights": True} if name == "googlenet" else {}
        float_model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
        x = torch.randn(1, 3, 64, 64)
    binary = copy.deepcopy(float_model)
    plan = plan_binarization(binary, x)
    apply_binarization(binary, plan.binary, get_scheme("xnor"))
    return float_model, binary.eval(), x


def measure(name: str, rounds: int, inner: int) -> dict[str, float]:
    float_model, binary, x = models(name)
    planned = to_runtime(binary)
    as_written = to_runtime(binary)
    blocks = 0
    for m in as_written.modules():
        if isinstance(m.__dict__.get("forward"), BlockForward):
            del m.forward  # the class's own forward, as before planned blocks
            blocks += 1
    contenders = {"torch fp32": float_model, "packed, blocks as written": as_written, "packed, planned": planned}
    with torch.no_grad():
        assert torch.equal(planned(x), as_written(x)) and torch.equal(planned(x), as_written(x))
        times = interleaved_times({k: partial(m, x) for k, m in contenders.items()}, rounds, inner)
    out = {f"{k} ms": statistics.median(v) * 1e3 for k, v in times.items()}
    out["planned speed-up"] = statistics.median(
        a / b for a, b in zip(times["packed, blocks as written"], times["packed, planned"], strict=True))
    out["blocks"] = blocks
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["resnet18 example", "resnet18", "googlenet"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "runtime_planned_blocks.md")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    set_threads(1)
    rows = {name: measure(name, args.rounds, args.inner) for name in args.models}
    flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_vpopcntdq") if f in cpu_flags())
    lines = [header("Blocks with their own forward: planned vs as written (packed runtime, batch 1, one thread)"),
             f"- CPU flags: {flags}; packed kernel: `{kernel_status().isa}`",
             f"- {args.rounds} interleaved rounds x {args.inner} calls per contender; medians (speed-up: median of "
             "per-round ratios); outputs of the two packed variants checked equal bit for bit first\n",
             "| model | blocks planned | torch fp32 ms | packed, blocks as written ms | packed, planned ms | "
             "planned speed-up |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {int(r['blocks'])} | {r['torch fp32 ms']:.3f} | "
                     f"{r['packed, blocks as written ms']:.3f} | {r['packed, planned ms']:.3f} | "
                     f"{r['planned speed-up']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_record(args.out, text)


if __name__ == "__main__":
    main()
