"""Training and evaluation loops for the binary main network.

Defaults follow common BNN practice: Adam, a cosine learning-rate schedule
stepped per batch, no weight decay, latent weights of binary convs clipped to
[-1, 1] after every step (outside that range the straight-through gradient is 0
and a weight could never flip back).

Distillation (optional): a frozen *teacher* network's outputs soften the
target, as in Hinton et al. 2015 and the binary-network work that builds on it
(Real-to-Binary, Martinez et al. 2020; ReActNet, Liu et al. 2020):

    loss = CE(s, y) + weight * T^2 * KL(softmax(t / T) || softmax(s / T))

with ``s`` the student's logits, ``t`` the teacher's and ``T`` the temperature
(``T^2`` keeps the soft term's gradient on the scale of the hard one).

Two entry points: :func:`fit` trains an in-memory model on any iterable of
``(x, y)`` batches (a user's ``DataLoader``), with no files; :func:`train_epochs`
is what ``bnnslim binarize`` runs: epochs over a dataset with a checkpoint after
each. Its data order is a pure function of ``(seed, epoch)`` and each epoch
starts from a checkpointed RNG state, so a resumed run equals an uninterrupted
one. Under ``torch.distributed`` the loaders shard with ``DistributedSampler``
and metrics are summed over ranks; the same code runs in one process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

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
from bnnslim.modes import evaluating

#: Mixes a seed with a phase (epoch, group) into one generator seed: a prime larger than any phase count,
#: so that (seed, phase) pairs never collide.
SEED_STRIDE = 1_000_003


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
    distill: float = 1.0  # weight of the distillation term, when training has a teacher
    temperature: float = 4.0  # its temperature


@dataclass(frozen=True)
class Distillation:
    """How a teacher's outputs enter the loss: ``CE + weight * T^2 * KL`` (module docstring).

    ``weight = 0`` turns distillation off (the teacher is then not run at all).
    """

    weight: float = 1.0
    temperature: float = 4.0

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise BnnslimError(f"distillation weight {self.weight} is negative", "give a weight >= 0 (0 = off)")
        if self.temperature <= 0:
            raise BnnslimError(f"distillation temperature {self.temperature} is not positive",
                               "give a temperature > 0, e.g. 4")

    @property
    def active(self) -> bool:
        return self.weight > 0


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch; 0 when ``s == t``."""
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_t = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (t * t)


def training_loss(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                  distill: Distillation | None = None) -> torch.Tensor:
    """Cross-entropy, plus the distillation term when teacher logits are given and ``distill`` is active."""
    loss = F.cross_entropy(logits.float(), y)
    if teacher_logits is not None and distill is not None and distill.active:
        loss = loss + distill.weight * distillation_loss(logits, teacher_logits, distill.temperature)
    return loss


class Teacher:
    """A frozen network whose logits guide training: eval mode, no gradients, never updated.

    ``Teacher(module)`` keeps a reference (the caller must not train it);
    :meth:`copy_of` takes a deep copy first, e.g. of the unpruned network
    before its masks are installed.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()

    @classmethod
    def copy_of(cls, model: nn.Module) -> Teacher:
        import copy

        core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        return cls(copy.deepcopy(core))

    def to(self, device: torch.device | str) -> Teacher:
        self.module.to(device)
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self.module(x)


def as_teacher(teacher: Teacher | nn.Module | None) -> Teacher | None:
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, nn.Module):
        return Teacher(teacher)
    raise BnnslimError(f"teacher must be an nn.Module, not {type(teacher).__name__}", "pass the teacher network")


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
        sampler = SequentialSampler(cast(Sized, dataset))
    elif shuffle:
        g = torch.Generator()
        g.manual_seed(seed * SEED_STRIDE + epoch)
        sampler = RandomSampler(cast(Sized, dataset), generator=g)
    else:
        sampler = SequentialSampler(cast(Sized, dataset))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


def limited(batches: Iterable, limit: int | None) -> Iterator:
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            return
        yield batch


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               clip: float | None, amp: bool = False, teacher: Teacher | None = None,
               distill: Distillation | None = None,
               after_backward: Callable[[], None] | None = None) -> tuple[float, int]:
    """One step of cross-entropy (plus distillation) training; returns (loss, correct count).

    With ``amp`` the forward pass runs under bfloat16 autocast (no loss scaling
    needed); latent weights and the optimizer stay float32. ``after_backward``
    runs between the backward pass and the update (e.g. averaging gradients
    across processes without DDP). The one training step of bnnslim: binarize,
    ``fit`` and the prune schedule's retraining and fine-tuning all take it.
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        soft = teacher(x) if teacher is not None and distill is not None and distill.active else None
        logits = model(x)
        loss = training_loss(logits, y, soft, distill)
    loss.backward()
    if after_backward is not None:
        after_backward()
    optimizer.step()
    if clip:
        clip_latent_weights(model, clip)
    return loss.item(), int((logits.argmax(1) == y).sum())


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256,
             limit: int | None = None) -> Metrics:
    """Loss and top-1 accuracy on ``dataset`` (the first ``limit`` batches), summed over ranks."""
    totals = torch.zeros(3, dtype=torch.float64)
    with evaluating(model):
        for x, y in limited(make_loader(dataset, batch_size, 0, 0, shuffle=False), limit):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            totals += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(),
                                    float((logits.argmax(1) == y).sum()), float(y.numel())], dtype=torch.float64)
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
        self.config = config
        self.config_json = json.dumps(asdict(config), sort_keys=True)

    def history(self) -> list[EpochRecord]:
        """The epochs recorded so far (none when there is no checkpoint yet)."""
        from bnnslim.rundir import read_checkpoint

        if not self.path.is_file():
            return []
        meta, _ = read_checkpoint(self.path, ("history",))
        return [EpochRecord(**h) for h in json.loads(meta["history"])]

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


def train_epochs(model: nn.Module, train_set: Dataset, test_set: Dataset, cfg: TrainConfig, device: torch.device,
                 checkpoint: Checkpoint | None = None, resume: bool = False,
                 on_step: Callable[[StepEvent], None] | None = None,
                 on_epoch: Callable[[EpochRecord], None] | None = None,
                 teacher: Teacher | nn.Module | None = None, distill: Distillation | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.epochs`` epochs, evaluating and checkpointing after each (``bnnslim binarize``).

    ``model`` may be wrapped in DistributedDataParallel; state is read from the
    wrapped module. With a ``teacher`` the loss is :func:`training_loss` with
    ``distill`` (default: ``cfg.distill`` and ``cfg.temperature``).
    """
    teacher = as_teacher(teacher)
    if teacher is not None:
        teacher.to(device)
        distill = distill or Distillation(cfg.distill, cfg.temperature)
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
            loss, ok = train_step(model, x, y, optimizer, cfg.clip, cfg.amp, teacher, distill)
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


def fit(model: nn.Module, train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *, epochs: int = 1,
        steps: int | None = None, lr: float = 1e-3, teacher: Teacher | nn.Module | None = None,
        distill: Distillation | None = None, optimizer: torch.optim.Optimizer | None = None,
        device: torch.device | str | None = None, clip: float | None = 1.0, amp: bool = False,
        on_step: Callable[[StepEvent], None] | None = None) -> list[float]:
    """Train an in-memory ``model`` on the user's own batches; no files, no run directory.

    ``train_loader`` is any re-iterable of ``(x, y)`` (a ``DataLoader``). Trains
    for ``epochs`` passes, or exactly ``steps`` steps when given (cycling the
    loader). Adam with a cosine schedule over the whole run unless an
    ``optimizer`` is given; latent weights of binary convs are clipped to
    ``[-clip, clip]`` after each step. With a ``teacher`` (a frozen network, e.g.
    the float original or the unpruned binary network) the loss is
    ``CE + weight * T^2 * KL`` (``distill``, default ``Distillation()``).
    ``device`` defaults to the model's. Returns the loss of every step.

    >>> losses = fit(model, DataLoader(train, batch_size=128, shuffle=True), epochs=2, teacher=float_model)
    """
    teacher = as_teacher(teacher)
    if teacher is not None and distill is None:
        distill = Distillation()
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if teacher is not None:
        teacher.to(device)
    if steps is None:
        try:
            per_epoch = len(train_loader)  # type: ignore[arg-type]
        except TypeError as exc:
            raise BnnslimError("the loader has no length", "pass steps=N to fit()") from exc
        steps = epochs * per_epoch
    if steps <= 0:
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    own_optimizer = optimizer is None
    optimizer = optimizer or torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if own_optimizer else None
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        batches = _cycle(train_loader)
        for step in range(steps):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, ok = train_step(model, x, y, optimizer, clip, amp, teacher, distill)
            if scheduler is not None:
                scheduler.step()
            losses.append(loss)
            if on_step is not None:
                on_step(StepEvent(0, step + 1, steps, loss, ok / max(1, y.numel())))
    finally:
        model.train(was_training)
    return losses


def _cycle(loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches forever (a new pass, hence a new shuffle, each time round)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise BnnslimError("the training loader yields no batches", "check the DataLoader and its dataset")
