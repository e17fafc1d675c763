"""Prune a torchvision ResNet-18 inside your own training script: no run directory, no CLI.

Run it as a script (`python examples/prune_torchvision.py --steps 20`) or read it
as a notebook: each block is what you would put in a cell. The data here is the
Fashion-MNIST subset that ships with bnnslim, resized to 32x32 and repeated to 3
channels; put your own DataLoader in its place. Every optimiser step of the
retraining is yours: the schedule only decides masks and keeps them applied.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

import bnnslim
from bnnslim.binary.convert import clip_latent_weights


def loaders(batch_size: int) -> tuple[DataLoader, DataLoader]:
    """Your data: here the bundled Fashion-MNIST subset as 3x32x32 images."""
    data = bnnslim.dataset("fashion-mnist-mini")

    def collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([img for img, _ in items])
        x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
        return x, torch.tensor([label for _, label in items])

    return (DataLoader(data.train, batch_size=batch_size, shuffle=True, collate_fn=collate),
            DataLoader(data.test, batch_size=256, collate_fn=collate))


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return right / total


def train_steps(model: torch.nn.Module, loader: DataLoader, steps: int, lr: float,
                teacher: torch.nn.Module | None = None) -> None:
    """A plain training loop of your own (with distillation from ``teacher`` when given)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = iter(loader)
    model.train()
    for _ in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(x)
            loss = loss + 16 * F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(soft / 4, 1), reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        clip_latent_weights(model)  # binary convs keep their latent weights in [-1, 1]


def main(steps: int = 20, keep: float = 0.5, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    train, test = loaders(batch_size=64)
    example_inputs = next(iter(train))[0][:2]

    # 1. your float model (random weights here; load trained ones as usual)
    model = torchvision.models.resnet18(num_classes=10)

    # 2. binarize (first conv and the classifier stay real) and train the binary network your way
    bmodel, _plan = bnnslim.binarize(model, example_inputs)
    train_steps(bmodel, train, steps, lr=2e-3)
    binary_accuracy = accuracy(bmodel, test)

    # 3. learn the masks group by group; the retraining between groups is your own loop
    config = bnnslim.ScheduleConfig(keep=keep, select_steps=steps, retrain_steps=0, finetune_steps=0)
    schedule = bnnslim.PruneSchedule(bmodel, example_inputs, config, teacher=None)
    teacher = bnnslim.Teacher.copy_of(bmodel)
    for group in schedule:
        mask = schedule.select(train)
        print(f"{group.id}: keeps {int(mask.sum())} of {group.size} channels")
        schedule.retrain(train)  # retrain_steps=0: a no-op that marks the group done
        train_steps(bmodel, train, steps, lr=5e-4, teacher=teacher.module)
    masks = schedule.close()

    # 4. slim for real (checked against the masked model), and save the 1-bit packed form
    slim = bnnslim.slim(bmodel, masks, example_inputs)
    path = bnnslim.save(slim, "resnet18-slim.bnn.safetensors", input_shape=(3, 32, 32), packed=True)
    reloaded = bnnslim.load(path, model=lambda: torchvision.models.resnet18(num_classes=10))
    result = {
        "binary accuracy": binary_accuracy,
        "slim accuracy": accuracy(slim, test),
        "reloaded accuracy": accuracy(reloaded, test),
        "parameters before": float(sum(p.numel() for p in bmodel.parameters())),
        "parameters after": float(sum(p.numel() for p in slim.parameters())),
    }
    for key, value in result.items():
        print(f"{key}: {value:.4g}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training / selection steps per phase")
    parser.add_argument("--keep", type=float, default=0.5)
    args = parser.parse_args()
    main(args.steps, args.keep)
