"""End to end, batch 1, one thread: the slim binary examples on the packed runtime vs their float originals (issue 7).

For NIN, VGG-11 and ResNet-18 (the examples, full width, CIFAR form 3x32x32),
each a real run (binarize a few steps -> prune --keep 0.5 --strategy l1 -> export;
see ``export_sizes_latency.py``, whose ``make_run`` this reuses), times at batch 1
with one thread:

* float NCHW: the user's model as built (unpruned, real) -- the issue's baseline;
* float channels-last: the same model and input in channels-last memory format
  (torch's faster CPU path for convs; what a careful float user might run);
* slim torch: ``bnnslim.load(model.safetensors)`` (binary convs emulated in float);
* slim packed: ``bnnslim.load(model.bnn.safetensors, runtime="packed")``;
* unpruned packed: the binarized model before pruning on the runtime (reference).

Round-robin rounds of ``--inner`` calls each; speed-ups are medians of per-round
ratios. A per-layer pass (forward hooks) splits the slim packed model's time into
its real convs/linears, its packed binary convs, and everything else (batch
norm, pooling, activations, memory-format conversion): what bounds the speed-up.

    python benchmarks/runtime_end_to_end.py       # writes runtime_end_to_end.md beside it
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import header, write_record  # noqa: E402
from export_sizes_latency import make_run, register_datasets, run_path  # noqa: E402

import bnnslim  # noqa: E402
from bnnslim.bench import float_original, median_ratio, per_layer_times, time_round_robin  # noqa: E402
from bnnslim.model_file import read_header  # noqa: E402
from bnnslim.run_model import load_run_model  # noqa: E402
from bnnslim.rundir import RunDir  # noqa: E402
from bnnslim.runtime import (  # noqa: E402
    PackedBinaryConv2d,
    RuntimePlan,
    cpu_flags,
    cpu_model,
    kernel_status,
    runtime_plan,
    set_threads,
    to_runtime,
    with_emulation,
)

NETWORKS = ["nin", "vgg11", "resnet18"]
COLUMNS = ["float NCHW", "float channels-last", "slim torch", "slim packed", "unpruned packed"]
TARGET = 3.0
FLAGS = ["popcnt", "avx2", "avx512f", "avx512bw", "avx512_vpopcntdq"]


class ChannelsLast(nn.Module):
    """The float model with its input converted to channels-last on entry (weights converted once)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


@dataclass
class Result:
    times: dict[str, list[float]]  # model -> seconds per call, per round
    plan: RuntimePlan
    exact: bool  # slim packed == its own torch emulation, bit for bit
    split: dict[str, float]  # slim packed: seconds per call by kind of layer
    total: float  # slim packed: median seconds per call
    first_real: tuple[str, float]  # the first real layer and its seconds per call


def measure(run: Path, rounds: int, inner: int) -> Result:
    packed_path, plain_path = run / "model.bnn.safetensors", run / "model.safetensors"
    meta = read_header(packed_path)
    shape = [int(d) for d in json.loads(meta["input_shape"])]
    flt = float_original(meta, None, packed_path)
    unpruned = load_run_model(RunDir(run)).model.eval()
    models: dict[str, nn.Module] = {
        "float NCHW": flt,
        "float channels-last": ChannelsLast(flt).eval(),
        "slim torch": bnnslim.load(plain_path),
        "slim packed": bnnslim.load(packed_path, runtime="packed"),
        "unpruned packed": to_runtime(unpruned),
    }
    plan = runtime_plan(models["slim packed"])
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = bool(torch.equal(models["slim packed"](x), with_emulation(models["slim packed"])(x)))
    times = time_round_robin(models, x, rounds, warmup=10, inner=inner)
    layers = per_layer_times({"slim packed": models["slim packed"]}, x, rounds * inner)["slim packed"]
    modules = dict(models["slim packed"].named_modules())
    split = {"real convs and linears": 0.0, "packed binary convs": 0.0}
    for name, seconds in layers.items():
        part = "packed binary convs" if isinstance(modules[name], PackedBinaryConv2d) else "real convs and linears"
        split[part] += seconds
    total = statistics.median(times["slim packed"])
    split["other (BN, pooling, activations, layout)"] = max(0.0, total - sum(split.values()))
    # the first timed layer that is not a packed binary conv (the runtime may have folded the first conv into
    # the small-conv kernel or the sign packing: timed under the conv's own name all the same)
    first_real = next(n for n in layers if not isinstance(modules[n], PackedBinaryConv2d))
    return Result(times, plan, exact, split, total, (first_real, layers[first_real]))


def report(results: dict[str, Result], args: argparse.Namespace, cifar_data: str, load: tuple[float, ...],
           seconds: float) -> str:
    status = kernel_status()
    flags = cpu_flags()
    lines = [header("Runtime end to end: slim binary examples, batch 1, one thread"),
             f"- CPU: {cpu_model()}; flags: {', '.join(f for f in FLAGS if f in flags)}; packed kernel: "
             f"`{status.isa}`; threads: 1",
             f"- models: the examples at full width, 3x32x32, each binarized ({args.train_steps} training steps on "
             f"{cifar_data}), pruned with `--keep {args.keep} --strategy l1` and exported (plain + packed)"
             + (f"; runs reused from --workdir: {', '.join(args.reused)}" if args.reused else ""),
             f"- timing: {args.rounds} round-robin rounds x {args.inner} calls after 10 warm-up calls; medians; "
             "speed-ups are medians of per-round ratios",
             f"- load average (1 min) at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f} (a 2-vCPU VM shared "
             f"with other engineers' processes); whole run {seconds:.0f} s",
             "", f"## Speed-up of the slim packed model (target: >= {TARGET:.0f}x over the float original)", "",
             "| network | vs float NCHW (as built) | vs float channels-last | vs slim torch | vs unpruned packed | "
             f"target {TARGET:.0f}x met |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        t = r.times
        vs = median_ratio(t, "float NCHW", "slim packed")
        lines.append(f"| {name} | {vs:.1f}x | {median_ratio(t, 'float channels-last', 'slim packed'):.1f}x | "
                     f"{median_ratio(t, 'slim torch', 'slim packed'):.1f}x | "
                     f"{median_ratio(t, 'unpruned packed', 'slim packed'):.2f}x | {'yes' if vs >= TARGET else 'no'} |")
    lines += ["", "## Median latency (ms)", "", "| network | " + " | ".join(COLUMNS) + " |",
              "|---|" + "---|" * len(COLUMNS)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{statistics.median(r.times[c]) * 1e3:.3f}" for c in COLUMNS) + " |")
    lines += ["", "## Where the slim packed model's time goes (per-layer hooks)", "",
              "| network | packed binary convs | real convs and linears | of which the first conv | "
              "other (BN, pooling, activations, layout) | binary convs on the kernels |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        first, first_s = r.first_real
        cells = [f"{r.split[k] * 1e3:.3f} ms ({r.split[k] / r.total:.0%})" for k in
                 ("packed binary convs", "real convs and linears", "other (BN, pooling, activations, layout)")]
        n_binary = len(r.plan.kernel) + len(r.plan.emulated) + len(r.plan.unchanged)
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | `{first}` {first_s * 1e3:.3f} ms | {cells[2]} | "
                     f"{len(r.plan.kernel)} of {n_binary} |")
    met = [n for n, r in results.items() if median_ratio(r.times, "float NCHW", "slim packed") >= TARGET]
    outside = [1 - r.split["packed binary convs"] / r.total for r in results.values()]
    lines += ["", "## Findings", "",
              f"- Target >= {TARGET:.0f}x over the float original at batch 1, one thread: met by "
              f"{', '.join(met) or 'none'}" + (f"; missed by {', '.join(n for n in results if n not in met)}"
                                               if len(met) < len(results) else "") + ".",
              "- Against a float model run channels-last (torch's faster CPU conv path) the margin is smaller; "
              "both are shown so that the comparison is honest.",
              f"- The packed binary convs are {1 - max(outside):.0%}-{1 - min(outside):.0%} of the slim packed "
              "model's time (chains of binary convs are fused: batch norm, Hardtanh, max pooling and the next sign "
              "run inside them as integer thresholds and OR-pooling of packed bits; batch norms and clamps after "
              "them fold into their epilogues); the rest is the real first conv and classifier and the layers around "
              "residual adds and average pooling, which need real values: at batch 1 each torch call costs 10-50 us "
              "whatever its size (the per-layer hooks here add a few us each).",
              "- Pruning to keep 0.5 makes the packed model faster by the 'vs unpruned packed' factor only: its binary "
              "convs were already cheap."]
    lines += ["", "Checks: the slim packed model equals its own torch emulation bit for bit: "
              + ", ".join(f"{n} {'yes' if r.exact else 'NO'}" for n, r in results.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="*", default=NETWORKS)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--retrain-steps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="runs live here; an exported run found there is reused (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=HERE / "runtime_end_to_end.md")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    started, load = time.perf_counter(), os.getloadavg()
    cifar_data = register_datasets()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bnnslim-e2e-"))
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    args.reused = []
    try:
        for name in args.networks:
            run = run_path(root, name)
            if (run / "model.bnn.safetensors").is_file():
                args.reused.append(name)
            else:
                torch.set_num_threads(2)
                make_run(root, name, args.keep, args.train_steps, args.retrain_steps)
            set_threads(1)
            results[name] = measure(run, args.rounds, args.inner)
            print(f"{name}: done", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    text = report(results, args, cifar_data, load, time.perf_counter() - started)
    print(text)
    write_record(args.out, text)


if __name__ == "__main__":
    main()
