"""Learned (subsidiary) selection vs rule-based baselines on full Fashion-MNIST.

For the NIN-style and VGG-style examples: train the binary main network once,
then prune it with every built-in strategy at keep 0.8 and 0.5, each with the
same layer-wise schedule and retraining budget, and report test accuracy.
Also times one selector-learning step against one plain training step.
Writes ``prune_fashion_mnist.md`` beside it.

    python benchmarks/prune_fashion_mnist.py --width 0.25 --epochs 3
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bnnslim.stages.binarize import BinarizeOptions, binarize
from bnnslim.stages.prune import PruneOptions, prune
from bnnslim.train import TrainConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import header, write_record  # noqa: E402

STRATEGIES = ["subsidiary", "l1", "alpha", "bn", "random", "greedy"]


def model_file(tmp: Path, example: str, width: float) -> Path:
    """A model file that builds the example at ``width`` (what a user would write)."""
    path = tmp / f"{Path(example).stem}_w{width}.py"
    source = str(HERE.parent / "examples" / example)
    path.write_text(f"import importlib.util\nspec = importlib.util.spec_from_file_location('ex', {source!r})\n"
                    "ex = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(ex)\n\n"
                    f"def build_model(num_classes=10, in_channels=1):\n"
                    f"    return ex.build_model(num_classes, in_channels, width={width})\n")
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds_per_step(model, optimizer, x, y, steps: int, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    """Seconds per optimisation step of cross-entropy on one fixed batch, after 3 warm-up steps."""
    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(3):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t) / steps


def step_times(run: Path, device: torch.device, steps: int = 20) -> tuple[float, float]:
    """Seconds per selector-learning step and per plain training step (same batch size)."""
    from bnnslim.graph import build_graph
    from bnnslim.prune.groups import find_groups
    from bnnslim.prune.masking import MaskController
    from bnnslim.prune.subsidiary import selector_mask
    from bnnslim.run_model import load_run_model
    from bnnslim.rundir import RunDir

    loaded = load_run_model(RunDir(run))
    model, example = loaded.model, loaded.example()
    groups = find_groups(model, build_graph(model, example), example).groups
    model.to(device)
    x = torch.randn(128, *loaded.input_shape, device=device)
    y = torch.randint(0, 10, (128,), device=device)

    model.train()
    plain = _seconds_per_step(model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y, steps, device)

    controller = MaskController(model, groups)
    s = torch.full((groups[0].size,), 0.1, requires_grad=True, device=device)
    controller.set_source(groups[0].id, lambda: selector_mask(s))
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    select = _seconds_per_step(model, torch.optim.SGD([s], lr=0.005, momentum=0.9), x, y, steps, device)
    controller.remove()
    return select, plain


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.5])
    parser.add_argument("--models", nargs="+", default=["nin.py", "vgg11.py"])
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--select-steps", type=int, default=50)
    parser.add_argument("--retrain-steps", type=int, default=100)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bnnslim-bench-prune"))
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist-mini for a quick smoke run")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=HERE / "prune_fashion_mnist.md")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    out = [header("Prune: subsidiary selectors vs rule-based baselines on full Fashion-MNIST"),
           f"\nModels: the examples at width {args.width} (channels x {args.width}), 1x28x28 inputs. Binary main "
           f"network: {args.epochs} epochs, Adam lr 2e-3, batch 128, xnor. Pruning: every strategy with the same "
           f"schedule, {args.select_steps} selection steps and {args.retrain_steps} retraining steps per group, "
           f"batch 128, seed 0; accuracy on the 10,000 test images. Device: {args.device}"
           + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "") + ".\n"]
    for example in args.models:
        base = args.work / Path(example).stem / "base"
        t = time.perf_counter()
        trained = binarize(BinarizeOptions(model=str(model_file(args.work, example, args.width)), run=base,
                                           data=args.data, data_root=args.data_root, device=args.device,
                                           train=TrainConfig(epochs=args.epochs, lr=2e-3, batch_size=128)))
        print(f"{example}: binary accuracy {trained.test_accuracy:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
        select_t, plain_t = step_times(base, torch.device(args.device))
        out += [f"\n## {example} (width {args.width})\n",
                f"Unpruned binary network: test accuracy **{trained.test_accuracy:.4f}**.\n",
                f"One selector-learning step takes {select_t / plain_t:.2f}x the time of one plain training step "
                f"({select_t * 1000:.0f} ms vs {plain_t * 1000:.0f} ms at batch 128).\n",
                "| keep | strategy | filters kept | test accuracy | change vs unpruned | seconds |",
                "|---|---|---|---|---|---|"]
        for keep in args.keeps:
            for strategy in args.strategies:
                run = args.work / Path(example).stem / f"{strategy}-{keep}"
                shutil.copytree(base, run)
                t = time.perf_counter()
                r = prune(run, PruneOptions(keep=keep, strategy=strategy, select_steps=args.select_steps,
                                            retrain_steps=args.retrain_steps, device=args.device))
                line = (f"| {keep} | {strategy} | {r.kept_filters}/{r.total_filters} | {r.accuracy_after:.4f} | "
                        f"{100 * (r.accuracy_after - trained.test_accuracy):+.2f} pt | {time.perf_counter() - t:.0f} |")
                out.append(line)
                print(example, line, flush=True)
                write_record(args.out, "\n".join(out) + "\n\n(partial: still running)\n")
    write_record(args.out, "\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
