"""Prune's own cost beyond its training steps, against the number of prunable groups (issue 11).

A chain of N binary conv blocks (16 channels, 16x16 inputs, batch 32) is pruned
to keep 0.5 with ``bnnslim.learn_masks``, no fine-tuning, twice: with k and with
3k selection and retraining steps per group. Wall time is linear in the steps,
``T = overhead + steps * per_step``; the two runs give both. The overhead
(tracing, finding groups, the budget, masks, selectors, events, evaluation on
the held-out batch) is reported in total and per group for N = 4 ... 32: it
must stay small and grow no faster than N.

    python benchmarks/prune_overhead.py            # writes benchmarks/prune_overhead.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import bnnslim

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import header, write_record  # noqa: E402

BATCH, WIDTH, SIZE = 32, 16, 16


def chain(n: int) -> nn.Module:
    """A stem conv, ``n`` binary-able conv blocks, a real head: ``n`` prunable groups."""
    def block(cin: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, WIDTH, 3, padding=1, bias=False), nn.BatchNorm2d(WIDTH), nn.Hardtanh()]
    layers = block(1)
    for _ in range(n):
        layers += block(WIDTH)
    return nn.Sequential(*layers, nn.Conv2d(WIDTH, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 1, SIZE, SIZE, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(8)]


def wall(n: int, strategy: str, steps: int) -> tuple[float, int]:
    """Seconds of ``learn_masks`` on a fresh binarized chain of ``n`` blocks, and the training steps it took."""
    torch.manual_seed(0)
    example = torch.randn(2, 1, SIZE, SIZE)
    model, _ = bnnslim.binarize(chain(n), example)
    data = batches(n)
    t = time.perf_counter()
    masks = bnnslim.learn_masks(model, example, data, keep=0.5, strategy=strategy, select_steps=steps,
                                retrain_steps=steps, finetune_steps=0, heldout=data[0])
    seconds = time.perf_counter() - t
    assert len(masks) == n
    return seconds, n * steps * (2 if strategy == "subsidiary" else 1)


def measure(n: int, strategy: str, k: int, repeats: int = 3) -> dict[str, float]:
    """Overhead and per-step time from runs at k and 3k steps per group (medians of ``repeats``)."""
    low = [wall(n, strategy, k) for _ in range(repeats)]
    high = [wall(n, strategy, 3 * k) for _ in range(repeats)]
    t_low, steps_low = statistics.median(t for t, _ in low), low[0][1]
    t_high, steps_high = statistics.median(t for t, _ in high), high[0][1]
    per_step = (t_high - t_low) / (steps_high - steps_low)
    overhead = t_low - steps_low * per_step
    return {"groups": n, "total": t_low, "step": per_step, "steps": steps_low, "overhead": overhead,
            "per_group": overhead / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--strategies", nargs="+", default=["subsidiary", "bn"])
    parser.add_argument("--steps", type=int, default=4, help="k: selection and retraining steps per group")
    parser.add_argument("--out", type=Path, default=HERE / "prune_overhead.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = [header("Prune's overhead beyond its training steps, against the number of groups"), "",
           f"Chain of N binary conv blocks ({WIDTH} channels, {SIZE}x{SIZE}, batch {BATCH}), keep 0.5, "
           f"k = {args.steps} selection and retraining steps per group (and 3k), no fine-tuning, one thread; "
           "medians of 3 runs. Overhead = the intercept of wall time against steps.",
           "",
           "| strategy | groups | wall at k (s) | steps at k | one step (ms) | overhead (s) | overhead per group (s) |",
           "|---|---|---|---|---|---|---|"]
    for strategy in args.strategies:
        for n in args.groups:
            r = measure(n, strategy, args.steps)
            line = (f"| {strategy} | {n} | {r['total']:.2f} | {r['steps']} | {1000 * r['step']:.1f} | "
                    f"{r['overhead']:.2f} | {r['per_group']:.3f} |")
            print(line, flush=True)
            out.append(line)
    write_record(args.out, "\n".join(out))


if __name__ == "__main__":
    main()
