"""Images per second: bnnslim's training loop vs a plain PyTorch loop, same binary model.

Both train the binarized ``examples/resnet18.py`` (CIFAR form) on the same
in-memory random 3x32x32 data with Adam, the same batch size and the same
DataLoader settings; the plain loop is the textbook one (zero_grad, forward,
cross-entropy, backward, step) plus the latent-weight clipping every BNN needs.
bnnslim's adds its schedule, progress callback, per-epoch evaluation excluded.

    python benchmarks/train_throughput.py --device cpu --width 0.25 --steps 30
    python benchmarks/train_throughput.py --device cuda --width 1.0 --steps 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bnnslim.binary.convert import apply_binarization, clip_latent_weights, plan_binarization
from bnnslim.model_source import load_model_source
from bnnslim.plugins import get_scheme
from bnnslim.train import TrainConfig, make_loader, make_optimizer, train_step

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import header, write_record  # noqa: E402


def model(width: float, device: torch.device) -> torch.nn.Module:
    source = load_model_source(str(HERE.parent / "examples" / "resnet18.py"))
    torch.manual_seed(0)
    m = source.factory(num_classes=10, in_channels=3, width=width)
    plan = plan_binarization(m, torch.randn(2, 3, 32, 32))
    return apply_binarization(m, plan.binary, get_scheme("xnor")).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bnnslim_loop(m, data, cfg: TrainConfig, device, steps: int) -> float:
    """bnnslim.train's step and loader, as ``fit`` runs them."""
    opt = make_optimizer(m.parameters(), cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    seen = 0
    batches = iter(make_loader(data, cfg.batch_size, cfg.seed, 0, shuffle=True))
    for _ in range(5):  # warm-up
        x, y = next(batches)
        train_step(m, x.to(device), y.to(device), opt, cfg.clip, cfg.amp)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        train_step(m, x, y, opt, cfg.clip, cfg.amp)
        sched.step()
        seen += y.numel()
    sync(device)
    return seen / (time.perf_counter() - t)


def plain_loop(m, data, cfg: TrainConfig, device, steps: int) -> float:
    opt = torch.optim.Adam(m.parameters(), lr=cfg.lr)
    loader = iter(DataLoader(data, batch_size=cfg.batch_size, shuffle=True, pin_memory=device.type == "cuda"))
    seen = 0

    def step(x, y) -> None:
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        clip_latent_weights(m)

    for _ in range(5):
        x, y = next(loader)
        step(x.to(device), y.to(device))
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        x, y = next(loader)
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        seen += y.numel()
    sync(device)
    return seen / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    n = args.batch_size * (args.steps + 10)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    cfg = TrainConfig(batch_size=args.batch_size, lr=1e-3)
    rows = []
    for r in range(args.repeats):  # alternate which goes first, so warm-up and drift hit both
        if r % 2 == 0:
            a = bnnslim_loop(model(args.width, device), data, cfg, device, args.steps)
            b = plain_loop(model(args.width, device), data, cfg, device, args.steps)
        else:
            b = plain_loop(model(args.width, device), data, cfg, device, args.steps)
            a = bnnslim_loop(model(args.width, device), data, cfg, device, args.steps)
        rows.append((a, b))
        print(f"repeat {r}: bnnslim {a:.0f} img/s, plain {b:.0f} img/s, ratio {a / b:.3f}", flush=True)
    ratios = sorted(a / b for a, b in rows)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    text = "\n".join([
        header(f"Training throughput on {args.device}: bnnslim's loop vs a plain loop"),
        f"\nBinary ResNet-18 (CIFAR form, width {args.width}), batch {args.batch_size}, {args.steps} timed steps "
        f"after 5 warm-up steps, {args.repeats} repeats alternating which loop runs first, device {name}.\n",
        "| repeat | bnnslim img/s | plain img/s | ratio |", "|---|---|---|---|",
        *[f"| {i} | {a:.0f} | {b:.0f} | {a / b:.3f} |" for i, (a, b) in enumerate(rows)],
        f"\nMedian ratio bnnslim / plain: **{ratios[len(ratios) // 2]:.3f}** (target: at least 0.9).\n",
    ])
    out = args.out or HERE / f"train_throughput_{device.type}.md"
    write_record(out, text)
    print(text)


if __name__ == "__main__":
    main()
