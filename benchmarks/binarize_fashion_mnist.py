"""Float vs binary accuracy of examples/small_cnn.py on full Fashion-MNIST, and time per epoch.

Needs Debian's dataset-fashion-mnist package (``apt-get install dataset-fashion-mnist``)
or the torchvision files under --data-root. Writes ``binarize_fashion_mnist.md`` beside it.

    python benchmarks/binarize_fashion_mnist.py --epochs 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bnnslim.binary.convert import apply_binarization, plan_binarization
from bnnslim.model_source import load_model_source
from bnnslim.plugins import get_dataset, get_scheme
from bnnslim.train import TrainConfig, train_epochs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import header  # noqa: E402


def run(binary: bool, epochs: int, lr: float, data) -> tuple[list, float]:
    source = load_model_source(str(HERE.parent / "examples" / "small_cnn.py"))
    torch.manual_seed(0)
    model = source.build(num_classes=10, in_channels=1)
    if binary:
        example = torch.randn(2, 1, 28, 28)
        plan = plan_binarization(model, example)
        apply_binarization(model, plan.binary, get_scheme("xnor"))
    times: list[float] = []
    started = [time.perf_counter()]

    def on_epoch(rec) -> None:  # type: ignore[no-untyped-def]
        now = time.perf_counter()
        times.append(now - started[0])
        started[0] = now
        print(f"{'binary' if binary else 'float'} epoch {rec.epoch}: test acc {rec.test_accuracy:.4f}", flush=True)

    result = train_epochs(model, data.train, data.test, TrainConfig(epochs=epochs, lr=lr, batch_size=128),
                          torch.device("cpu"), on_epoch=on_epoch)
    return result.history, sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--data-root", type=Path, default=None)
    args = parser.parse_args()
    data = get_dataset("fashion-mnist").build(args.data_root)
    rows = []
    for binary in (False, True):
        history, per_epoch = run(binary, args.epochs, args.lr, data)
        rows.append((binary, history, per_epoch))
    lines = [header("Binarize: float vs binary small CNN on full Fashion-MNIST"),
             f"\n60,000 train / 10,000 test images, batch 128, Adam lr {args.lr} with cosine schedule, "
             f"{args.epochs} epochs, seed 0, xnor scheme (first conv and the linear classifier real).\n",
             "| model | test accuracy per epoch | final test accuracy | seconds per epoch |",
             "|---|---|---|---|"]
    for binary, history, per_epoch in rows:
        accs = ", ".join(f"{h.test_accuracy:.4f}" for h in history)
        lines.append(f"| {'binary (bnnslim binarize)' if binary else 'float (same model)'} | {accs} | "
                     f"{history[-1].test_accuracy:.4f} | {per_epoch:.1f} |")
    ratio = rows[1][2] / rows[0][2]
    lines.append(f"\nBinary epoch time / float epoch time: {ratio:.2f} (sign and scale are emulated in float; "
                 "the speed comes from `bnnslim export --format packed` and a binary runtime).\n")
    (HERE / "binarize_fashion_mnist.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
