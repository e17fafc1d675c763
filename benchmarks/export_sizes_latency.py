"""File sizes and CPU latency of exported models (issue 4): fp32 vs slim plain vs 1-bit packed.

For the examples (small_cnn, nin, vgg11, resnet18, all at full width) and
torchvision's resnet18, each a real run of the whole chain:

1. ``binarize`` with a few training steps, so batch-norm statistics are real
   (small_cnn on the bundled Fashion-MNIST subset, 1x28x28; the others in their
   CIFAR form, 3x32x32, on the ``shapes`` dataset of the bnnslim-synthetic-shapes
   plugin, or seeded random images when that plugin is not installed);
2. ``prune --keep 0.5 --strategy l1`` with tiny budgets (a real pruning mask);
3. ``export`` (plain and packed).

Then it reports, per model, the sizes on disk of the fp32 original
(``binary.safetensors``: the unpruned latent weights), the slim plain file and
the packed file, what the packed file is made of, and the CPU latency at batch 1
and 64 with one and two threads of: the float original (the user's model as
built, unpruned and real), the unpruned binary model (torch emulation), the slim
binary model (torch emulation), the slim model on bnnslim's packed runtime and,
for reference, the unpruned model on the packed runtime. Each configuration runs
the models round-robin (median of per-round ratios), so load from other
processes hits every side of a ratio alike. The MACs ratio slim/unpruned comes
from the export report (``layer_costs``).

    python benchmarks/export_sizes_latency.py            # writes export_sizes_latency.md beside it
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _common import header, write_record  # noqa: E402

import bnnslim  # noqa: E402
from bnnslim.bench import float_original, median_ratio, time_round_robin  # noqa: E402
from bnnslim.model_file import read_header, write_model_file  # noqa: E402
from bnnslim.run_model import load_run_model  # noqa: E402
from bnnslim.rundir import RunDir  # noqa: E402
from bnnslim.runtime import cpu_flags, cpu_model, kernel_status, set_threads, to_runtime, with_emulation  # noqa: E402
from bnnslim.stages.binarize import BinarizeOptions, binarize  # noqa: E402
from bnnslim.stages.export import ExportResult, export  # noqa: E402
from bnnslim.stages.prune import PruneOptions, prune  # noqa: E402
from bnnslim.train import TrainConfig  # noqa: E402

TORCHVISION_RESNET18 = """import torch
import torchvision

INPUT_SHAPE = (3, 32, 32)


def build_model(num_classes=10, in_channels=3):
    m = torchvision.models.resnet18(num_classes=num_classes)
    m.conv1 = torch.nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return m
"""

#: name -> (model spec, CIFAR form?)
MODELS: dict[str, tuple[str, bool]] = {
    "small_cnn": (str(REPO / "examples/small_cnn.py"), False),
    "nin": (str(REPO / "examples/nin.py"), True),
    "vgg11": (str(REPO / "examples/vgg11.py"), True),
    "resnet18": (str(REPO / "examples/resnet18.py"), True),
    "torchvision resnet18": ("torchvision_resnet18.py", True),
}
LATENCY = ("float", "binary unpruned", "slim torch", "slim packed", "unpruned packed")
FLAGS = ["popcnt", "avx2", "avx512f", "avx512bw", "avx512_vpopcntdq"]


TEST_IMAGES = 64  # the chain evaluates the test split three times: a small one keeps the runs quick


class BenchData:
    """Datasets for this benchmark (a plugin registered in-process): ``bench-cifar`` and ``bench-fashion``.

    ``bench-cifar`` is the ``shapes`` dataset of the bnnslim-synthetic-shapes plugin (3x32x32 synthetic images)
    when that plugin is installed, else seeded random 3x32x32 images; ``bench-fashion`` is the bundled
    Fashion-MNIST subset. Both keep only the first TEST_IMAGES test images.
    """

    source_of: ClassVar[dict[str, str]] = {"bench-cifar": "shapes", "bench-fashion": "fashion-mnist-mini"}

    @staticmethod
    def bnnslim_datasets():  # type: ignore[no-untyped-def]
        from torch.utils.data import Subset, TensorDataset

        from bnnslim.plugin_types import DatasetSpec, DatasetSplits
        from bnnslim.plugins import get_dataset

        def build(name: str):  # type: ignore[no-untyped-def]
            def make(root):  # type: ignore[no-untyped-def]
                source = BenchData.source_of[name]
                if source is None:
                    g = torch.Generator().manual_seed(0)
                    x, y = torch.randn(512, 3, 32, 32, generator=g), torch.randint(0, 10, (512,), generator=g)
                    return DatasetSplits(train=TensorDataset(x, y),
                                         test=TensorDataset(x[:TEST_IMAGES], y[:TEST_IMAGES]))
                splits = get_dataset(source).build(root)
                return DatasetSplits(train=splits.train, test=Subset(splits.test, range(TEST_IMAGES)))
            return make

        yield DatasetSpec(name="bench-cifar", description="3x32x32 images for the benchmark", input_shape=(3, 32, 32),
                          num_classes=10, build=build("bench-cifar"))
        yield DatasetSpec(name="bench-fashion", description="1x28x28 images for the benchmark",
                          input_shape=(1, 28, 28), num_classes=10, build=build("bench-fashion"))


def register_datasets() -> str:
    """Register ``bench-cifar`` and ``bench-fashion``; returns what ``bench-cifar`` is made of."""
    from bnnslim.hookspecs import hookimpl
    from bnnslim.plugins import datasets, get_plugin_manager

    if "shapes" not in datasets():
        BenchData.source_of["bench-cifar"] = None  # type: ignore[assignment]
    if "bench-cifar" not in datasets():
        plugin = BenchData()
        plugin.bnnslim_datasets = hookimpl(BenchData.bnnslim_datasets)  # type: ignore[method-assign]
        get_plugin_manager().register(plugin, name="benchmark-datasets")
    return "shapes (bnnslim-synthetic-shapes)" if BenchData.source_of["bench-cifar"] else "seeded random images"


def run_path(root: Path, name: str) -> Path:
    return root / name.replace(" ", "_")


def make_run(root: Path, name: str, keep: float, train_steps: int,
             retrain_steps: int) -> tuple[Path, ExportResult, float]:
    """binarize (a few steps) -> prune (l1, keep) -> export, in ``root/<name>``; returns run, export, seconds."""
    started = time.perf_counter()
    spec, cifar = MODELS[name]
    if not Path(spec).is_absolute():
        (root / spec).write_text(TORCHVISION_RESNET18, encoding="utf-8")
        spec = str(root / spec)
    run = run_path(root, name)
    shutil.rmtree(run, ignore_errors=True)
    register_datasets()
    binarize(BinarizeOptions(model=spec, run=run, data="bench-cifar" if cifar else "bench-fashion",
                             train=TrainConfig(epochs=1, steps_per_epoch=train_steps, batch_size=32)))
    prune(run, PruneOptions(keep=keep, strategy="l1", select_steps=1, retrain_steps=retrain_steps, batch_size=32,
                            heldout=64))
    result = export(run, evaluate_data=False)
    return run, result, time.perf_counter() - started


@dataclass
class Measured:
    name: str
    input_shape: list[int]
    sizes: dict[str, int]
    composition: dict[str, int]
    filters: tuple[int, int]  # binary conv filters before, after
    ops: dict[str, tuple[int, int]]  # "macs", "binary_ops", "all" -> (unpruned, slim) per image
    build_seconds: float
    exact: bool
    latency: dict[tuple[int, int], dict[str, list[float]]] = field(default_factory=dict)


def packed_composition(path: Path) -> dict[str, int]:
    """Bytes of the packed file by kind: sign bits, alpha, batch norm, real layers, header."""
    from safetensors import safe_open

    meta = read_header(path)
    layers = json.loads(meta["layers"])
    norms = {n for n, s in layers.items() if "features" in s}
    parts = {"sign bits": 0, "alpha": 0, "batch norm": 0, "real layers (first, last, shortcuts)": 0}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safetensors' safe_open is not a dict (no iteration)
            t = f.get_tensor(key)
            nbytes = t.numel() * t.element_size()
            owner = key.rsplit(".", 1)[0]
            kind = ("sign bits" if key.endswith(".weight_bits") else "alpha" if key.endswith(".alpha") else
                    "batch norm" if owner in norms else "real layers (first, last, shortcuts)")
            parts[kind] += nbytes
    parts["header and alignment"] = path.stat().st_size - sum(parts.values())
    return parts


def measure(name: str, run: Path, result: ExportResult, seconds: float, batches: list[int], threads: list[int],
            rounds: dict[int, int]) -> Measured:
    packed_path, plain_path = result.files["packed"], result.files["plain"]
    meta = read_header(packed_path)
    shape = [int(d) for d in json.loads(meta["input_shape"])]
    unpruned = load_run_model(RunDir(run)).model.eval()
    sizes = dict(result.sizes)
    with tempfile.TemporaryDirectory() as tmp:  # the unpruned binary model in the packed form, for comparison
        target = Path(tmp) / "unpruned.bnn.safetensors"
        write_model_file(target, unpruned, RunDir(run).read_manifest(), "packed")
        sizes["unpruned packed"] = target.stat().st_size
    models = {
        "float": float_original(meta, None, packed_path),
        "binary unpruned": unpruned,
        "slim torch": bnnslim.load(plain_path),
        "slim packed": bnnslim.load(packed_path, runtime="packed"),
        "unpruned packed": to_runtime(unpruned),
    }
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = bool(torch.equal(models["slim packed"](x), with_emulation(models["slim packed"])(x)))
    rows = result.rows
    ops = {k: (sum(r[f"{k}_before"] for r in rows), sum(r[f"{k}_after"] for r in rows)) for k in ("macs", "binary_ops")}
    ops["all"] = (ops["macs"][0] + ops["binary_ops"][0], ops["macs"][1] + ops["binary_ops"][1])
    binary_rows = [r for r in rows if r["kind"] == "binary conv"]
    m = Measured(name, shape, sizes, packed_composition(packed_path),
                 (sum(r["filters_before"] for r in binary_rows), sum(r["filters_after"] for r in binary_rows)),
                 ops, seconds, exact)
    for b in batches:
        xb = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b))
        for t in threads:
            set_threads(t)
            m.latency[(b, t)] = time_round_robin(models, xb, rounds[b], warmup=3 if b == 1 else 1,
                                                 inner=5 if b == 1 else 1)
            print(f"{name}: batch {b}, {t} thread(s) done", file=sys.stderr)
    return m


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:,.2f} MiB"


def report(results: list[Measured], args: argparse.Namespace, cifar_data: str, total_seconds: float) -> str:
    status = kernel_status()
    flags = cpu_flags()
    lines = [header("Export: file sizes and CPU latency (fp32 original, slim plain, 1-bit packed)"),
             f"- CPU: {cpu_model()}; flags: {', '.join(f for f in FLAGS if f in flags)}; packed kernel: `{status.isa}`",
             f"- chain per model: binarize ({args.train_steps} training steps, batch 32) -> prune --keep {args.keep} "
             f"--strategy l1 ({args.retrain_steps} retraining step(s) per group) -> export; data: small_cnn on "
             f"fashion-mnist-mini (1x28x28), the others on {cifar_data} (3x32x32, CIFAR form), test splits cut to "
             f"{TEST_IMAGES} images; full width",
             f"- latency: round-robin over the five models, {args.rounds_small} rounds x 5 calls at batch 1, "
             f"{args.rounds_large} rounds x 1 call at batch 64, after warm-up; medians; ratios are medians of "
             f"per-round ratios",
             f"- whole run: {total_seconds:.0f} s; load average (1 min) at start {args.load[0]:.1f}, at end "
             f"{os.getloadavg()[0]:.1f}",
             "- the machine is a 2-vCPU VM shared with other engineers' processes: absolute times are noisy, ratios "
             "taken within a round much less so; under load the 2-thread rows suffer most (an earlier run at load "
             "~3.5 took 9.5 minutes instead of about 1.5, with 2-thread latencies up to 100x worse)",
             "", "## File sizes", "",
             "fp32 original = `binary.safetensors` of the run (the unpruned latent weights, 32-bit floats: the "
             "size of the float model). Target from the issue: packed <= fp32 / 20 x kept fraction.", "",
             "| model | input | binary filters kept | fp32 original | slim plain | slim packed | packed / fp32 | "
             f"target (keep {args.keep} / 20) | holds | unpruned packed / fp32 | packed vs slim plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    target = args.keep / 20
    for m in results:
        fp32, plain, packed = m.sizes["fp32 original"], m.sizes["plain"], m.sizes["packed"]
        kept = m.filters[1] / m.filters[0]
        lines.append(f"| {m.name} | {'x'.join(map(str, m.input_shape))} | {m.filters[1]}/{m.filters[0]} "
                     f"({kept:.0%}) | {_kib(fp32)} | {_kib(plain)} | {_kib(packed)} | 1/{fp32 / packed:.1f} "
                     f"({packed / fp32:.4f}) | 1/{1 / target:.0f} ({target:.4f}) | "
                     f"{'yes' if packed / fp32 <= target else 'no'} | 1/{fp32 / m.sizes['unpruned packed']:.1f} | "
                     f"1/{plain / packed:.1f} |")
    lines += ["", "### What the packed file is made of", "",
              "| model | sign bits | alpha | batch norm | real layers (first, last, shortcuts) | header | "
              "packed / fp32 without the real layers |", "|---|---|---|---|---|---|---|"]
    for m in results:
        c = m.composition
        real = c["real layers (first, last, shortcuts)"]
        lines.append(f"| {m.name} | {_kib(c['sign bits'])} | {_kib(c['alpha'])} | {_kib(c['batch norm'])} | "
                     f"{_kib(real)} ({real / m.sizes['packed']:.0%}) | {_kib(c['header and alignment'])} | "
                     f"1/{m.sizes['fp32 original'] / (m.sizes['packed'] - real):.0f} |")
    lines += ["", "## Latency (ms, median)", "",
              "float = the user's model as built (unpruned, real, NCHW); binary unpruned = the binarized model before "
              "pruning in torch (float emulation of the binary convs); slim torch = `bnnslim.load(model.safetensors)`; "
              "slim packed = `bnnslim.load(model.bnn.safetensors, runtime=\"packed\")`; unpruned packed = the unpruned "
              "binary model on the packed runtime (reference).", "",
              "| model | batch | threads | " + " | ".join(LATENCY) + " |", "|---|---|---|" + "---|" * len(LATENCY)]
    for m in results:
        for (b, t), times in m.latency.items():
            lines.append(f"| {m.name} | {b} | {t} | " + " | ".join(f"{statistics.median(times[k]) * 1e3:,.2f}"
                                                               for k in LATENCY) + " |")
    lines += ["", "## Slimming: latency ratio vs MACs ratio, and speed-ups", "",
              "ops = real MACs + binary operations per image (from the export report). In torch's emulation every "
              "binary operation is a float MAC, so the slim/unpruned latency should track the ops ratio; on the "
              "packed runtime the binary operations cost ~1/64 of a MAC and the real layers weigh more.", "",
              "| model | batch | threads | ops slim/unpruned | binary ops slim/unpruned | "
              "latency slim/unpruned (torch) | latency slim/unpruned (packed) | slim packed vs float | "
              "slim packed vs slim torch |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in results:
        ops = m.ops["all"][1] / m.ops["all"][0]
        bops = m.ops["binary_ops"][1] / m.ops["binary_ops"][0]
        for (b, t), times in m.latency.items():
            lines.append(
                f"| {m.name} | {b} | {t} | {ops:.2f} | {bops:.2f} | "
                f"{1 / median_ratio(times, 'binary unpruned', 'slim torch'):.2f} | "
                f"{1 / median_ratio(times, 'unpruned packed', 'slim packed'):.2f} | "
                f"{median_ratio(times, 'float', 'slim packed'):.1f}x | "
                f"{median_ratio(times, 'slim torch', 'slim packed'):.1f}x |")
    lines += ["", "## Findings", "", *findings(results, args.keep)]
    lines += ["", "Checks: every slim packed model equals its own torch emulation bit for bit on a random batch: "
              + ", ".join(f"{m.name} {'yes' if m.exact else 'NO'}" for m in results) + ". Build time per model "
              "(binarize + prune + export): " + ", ".join(f"{m.name} {m.build_seconds:.0f} s" for m in results) + "."]
    return "\n".join(lines) + "\n"


def findings(results: list[Measured], keep: float) -> list[str]:
    """What the tables say, in sentences (recomputed on every run)."""
    out = []
    target = keep / 20
    held = [m.name for m in results if m.sizes["packed"] / m.sizes["fp32 original"] <= target]
    missed = [m for m in results if m.name not in held]
    out.append(f"- **Size target (packed <= fp32 / 20 x {keep}).** Holds for {', '.join(held) or 'none'}; "
               f"{'missed by ' + ', '.join(m.name for m in missed) if missed else 'no model misses it'}.")
    for m in missed:
        c = m.composition
        real = c["real layers (first, last, shortcuts)"]
        biggest = max(((k, v) for k, v in c.items() if k not in ("sign bits",)), key=lambda kv: kv[1])
        out.append(f"  - {m.name}: {_kib(m.sizes['packed'])} packed, of which {biggest[0]} {_kib(biggest[1])} "
                   f"({biggest[1] / m.sizes['packed']:.0%}); without the real layers it would be "
                   f"1/{m.sizes['fp32 original'] / (m.sizes['packed'] - real):.0f} of fp32, and even unpruned it packs "
                   f"to only 1/{m.sizes['fp32 original'] / m.sizes['unpruned packed']:.1f}.")
    out.append("  - Why: the 1/20 counts the binary layers only (32x smaller as bits). The real layers stay fp32 and "
               "the first conv is never pruned (its filters are not in a prunable group: only binary convs' filters "
               "are), batch norm and alpha stay float, and the JSON header is a fixed few KiB. Binary conv weights "
               f"shrink with about keep^2 (inputs and outputs are both pruned: {keep ** 2:.2f} here), so a model whose "
               "weights are mostly binary beats the target by far (VGG/ResNet), while one whose real first conv is a "
               "large share (NIN's 5x5 3->192 conv is 57.6 KB of fp32) or whose file is tiny (small_cnn: the header "
               "is a third of it) cannot reach it by pruning.")
    rows = [(m, t) for m in results for t in m.latency.values()]
    torch_gap = [(1 / median_ratio(t, "binary unpruned", "slim torch")) / (m.ops["all"][1] / m.ops["all"][0])
                 for m, t in rows]
    out.append(f"- **Slim latency vs MACs.** In torch's emulation the slim/unpruned latency ratio follows the ops "
               f"ratio (it is {min(torch_gap):.2f} to {max(torch_gap):.2f} times the ops ratio): above it where "
               "fixed costs weigh (the unpruned real first conv; batch norm, activations and pooling, which shrink "
               "with keep, not keep^2), below it at batch 1 for the large models, where torch's binary model spends "
               "most of its time re-binarizing the "
               "latent weights (sign and mean |W| of every weight at every call), which shrinks with the weight count. "
               "On the packed runtime the binary convs are already cheap, so slimming gains less "
               "(slim/unpruned latency in the table's packed column) than the ops ratio suggests.")
    per_model = []
    for m in results:
        speed = [median_ratio(t, "float", "slim packed") for t in m.latency.values()]
        per_model.append(f"{m.name} {min(speed):.1f}-{max(speed):.1f}x")
    out.append(f"- **Slim packed vs the float original** (over batches and thread counts): {'; '.join(per_model)}. "
               "A tiny network (small_cnn) gains least: fixed per-layer costs dominate; the torchvision ResNet-18 at "
               "32x32 runs its binary layers at 8x8 down to 1x1, where there is little to speed up.")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), help=f"from: {', '.join(MODELS)}")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--retrain-steps", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--rounds-small", type=int, default=7, help="rounds at batch 1 (5 calls each)")
    parser.add_argument("--rounds-large", type=int, default=3, help="rounds at larger batches (1 call each)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=HERE / "export_sizes_latency.md")
    args = parser.parse_args(argv)
    unknown = set(args.models) - set(MODELS)
    if unknown:
        sys.exit(f"unknown model(s) {sorted(unknown)}; choose from {list(MODELS)}")
    warnings.simplefilter("ignore", UserWarning)  # e.g. the ThreadsWarning at 2 threads on a 1-core machine
    started = time.perf_counter()
    args.load = os.getloadavg()
    cifar_data = register_datasets()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bnnslim-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rounds = {b: args.rounds_small if b == 1 else args.rounds_large for b in args.batches}
    results = []
    try:
        for name in args.models:
            torch.set_num_threads(2)  # building the runs is not what is measured
            run, result, seconds = make_run(root, name, args.keep, args.train_steps, args.retrain_steps)
            print(f"{name}: run built in {seconds:.0f} s", file=sys.stderr)
            results.append(measure(name, run, result, seconds, args.batches, args.threads, rounds))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    text = report(results, args, cifar_data, time.perf_counter() - started)
    print(text)
    write_record(args.out, text)


if __name__ == "__main__":
    main()
