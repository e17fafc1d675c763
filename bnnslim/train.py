"""Training and evaluation loops for the binary main network.

Defaults follow common BNN practice: Adam, a cosine learning-rate schedule
stepped per batch, no weight decay, latent weights of binary convs clipped to
[-1, 1] after every step (outside that range the straight-through gradient is 0
and a weight could never flip back).

Data order is a pure function of ``(seed, epoch)`` and each epoch starts from a
checkpointed RNG state, so a resumed run equals an uninterrupted one. Under
``torch.distributed`` the loaders shard with ``DistributedSampler`` and metrics
are summed over ranks; the same code runs in one process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, Subset
from torch.utils.data.distributed import DistributedSampler

from bnnslim import distributed as D
from bnnslim._atomic import save_tensors
from bnnslim._state import load_optimizer_state, load_rng_state, optimizer_state, rng_state
from bnnslim.binary.convert import clip_latent_weights
from bnnslim.errors import BnnslimError


@dataclass(frozen=True)
class TrainConfig:
    """Options of a training run (what ``--epochs``, ``--lr`` ... set)."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    seed: int = 0
    clip: float = 1.0
    steps_per_epoch: int | None = None  # cap on batches per epoch (quick runs, tests)
    workers: int = 0
    amp: bool = False  # automatic mixed precision (bfloat16 autocast; GPUs)
    channels_last: bool = False  # NHWC memory format (GPUs with tensor cores)


@dataclass
class Metrics:
    loss: float
    accuracy: float
    count: int


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float


@dataclass
class StepEvent:
    """Reported after every training step (for progress displays)."""

    epoch: int
    step: int
    steps: int
    loss: float
    accuracy: float


@dataclass
class TrainResult:
    history: list[EpochRecord] = field(default_factory=list)
    resumed_from_epoch: int = 0


def make_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, shuffle: bool,
                workers: int = 0) -> DataLoader:
    """A loader whose order depends only on ``(seed, epoch)``; sharded under torch.distributed.

    Training shards use ``DistributedSampler`` (equal shares, padded); evaluation
    shards take every ``world_size``-th item without padding, so that summed
    metrics count each test item exactly once.
    """
    if D.is_distributed() and shuffle:
        sampler: torch.utils.data.Sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    elif D.is_distributed():
        dataset = Subset(dataset, range(D.rank(), len(dataset), D.world_size()))  # type: ignore[arg-type]
        sampler = SequentialSampler(dataset)
    elif shuffle:
        g = torch.Generator()
        g.manual_seed(seed * 1_000_003 + epoch)
        sampler = RandomSampler(dataset, generator=g)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


def limited(batches: Iterable, limit: int | None) -> Iterator:
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            return
        yield batch


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               clip: float | None, amp: bool = False) -> tuple[float, int]:
    """One step of cross-entropy training; returns (loss, correct count).

    With ``amp`` the forward pass runs under bfloat16 autocast (no loss scaling
    needed); latent weights and the optimizer stay float32.
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    optimizer.step()
    if clip:
        clip_latent_weights(model, clip)
    return loss.item(), int((logits.argmax(1) == y).sum())


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256,
             limit: int | None = None) -> Metrics:
    """Loss and top-1 accuracy on ``dataset`` (the first ``limit`` batches), summed over ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for x, y in limited(make_loader(dataset, batch_size, 0, 0, shuffle=False), limit):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        totals += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(),
                                float((logits.argmax(1) == y).sum()), float(y.numel())], dtype=torch.float64)
    model.train(was_training)
    loss_sum, correct, count = D.all_reduce_sum(totals).tolist()
    if count == 0:
        raise BnnslimError("the evaluation set is empty", "check the dataset")
    return Metrics(loss=loss_sum / count, accuracy=correct / count, count=int(count))


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def steps_in_epoch(dataset: Dataset, cfg: TrainConfig) -> int:
    n = math.ceil(len(dataset) / (cfg.batch_size * D.world_size()))  # type: ignore[arg-type]
    return min(n, cfg.steps_per_epoch) if cfg.steps_per_epoch else n


class Checkpoint:
    """One safetensors file holding model, optimizer, scheduler and RNG state after an epoch."""

    def __init__(self, path: Path, config: TrainConfig) -> None:
        self.path = path
        self.config_json = json.dumps(asdict(config), sort_keys=True)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, history: list[EpochRecord]) -> None:
        if not D.is_main_process():
            return
        opt_tensors, opt_meta = optimizer_state(optimizer)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update(opt_tensors)
        tensors.update(rng_state())
        meta = {"epoch": str(epoch), "config": self.config_json, "optimizer": opt_meta,
                "scheduler": json.dumps(scheduler.state_dict()),
                "history": json.dumps([asdict(h) for h in history])}
        save_tensors(self.path, tensors, meta)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, list[EpochRecord]]:
        from bnnslim.rundir import read_checkpoint

        if not self.path.is_file():
            raise BnnslimError(f"nothing to resume: no training checkpoint at '{self.path}'",
                               "run without --resume to start training")
        meta, tensors = read_checkpoint(self.path, ("config", "optimizer", "scheduler", "history", "epoch"))
        if meta["config"] != self.config_json:
            raise BnnslimError("--resume with different training options than the interrupted run",
                               f"use the same options as before: {meta['config']}")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        load_optimizer_state(optimizer, tensors, meta["optimizer"])
        scheduler.load_state_dict(json.loads(meta["scheduler"]))
        load_rng_state(tensors)
        history = [EpochRecord(**h) for h in json.loads(meta["history"])]
        return int(meta["epoch"]), history


def fit(model: nn.Module, train_set: Dataset, test_set: Dataset, cfg: TrainConfig, device: torch.device,
        checkpoint: Checkpoint | None = None, resume: bool = False,
        on_step: Callable[[StepEvent], None] | None = None,
        on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.epochs`` epochs, evaluating and checkpointing after each.

    ``model`` may be wrapped in DistributedDataParallel; state is read from the
    wrapped module.
    """
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model.parameters(), cfg)
    per_epoch = steps_in_epoch(train_set, cfg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs * per_epoch))
    result = TrainResult()
    start = 0
    if resume and checkpoint is not None:
        start, result.history = checkpoint.load(core, optimizer, scheduler)
        result.resumed_from_epoch = start
    for epoch in range(start, cfg.epochs):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        loader = make_loader(train_set, cfg.batch_size, cfg.seed, epoch, shuffle=True, workers=cfg.workers)
        for step, (x, y) in enumerate(limited(loader, per_epoch)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss, ok = train_step(model, x, y, optimizer, cfg.clip, cfg.amp)
            scheduler.step()
            loss_sum += loss * y.numel()
            correct += ok
            seen += y.numel()
            if on_step is not None:
                on_step(StepEvent(epoch, step + 1, per_epoch, loss, ok / max(1, y.numel())))
        D.broadcast_buffers(core)  # every rank evaluates and saves rank 0's BatchNorm statistics
        test = evaluate(core, test_set, device, batch_size=max(cfg.batch_size, 256))
        record = EpochRecord(epoch + 1, loss_sum / max(1, seen), correct / max(1, seen), test.loss, test.accuracy)
        result.history.append(record)
        if checkpoint is not None:
            checkpoint.save(core, optimizer, scheduler, epoch + 1, result.history)
        if on_epoch is not None:
            on_epoch(record)
    return result
