"""The layer-wise, bottom-up schedule of Xu, Dong, Li, Su, "A Main/Subsidiary
Network Framework for Simplifying Binary Neural Networks" (CVPR 2019), on an
in-memory model: no files, the caller's own batches.

For each prunable group, in forward order (``groups.py``):

(a) *select*: the strategy scores the group's channels (the subsidiary strategy
    trains the group's selectors with the main network frozen); the budget
    (``budget.py``) turns its proposed count into a feasible one and the top-k
    scores are kept; that 0/1 mask is fixed from then on;
(b) *retrain*: the main network trains with all decided masks applied: every
    layer by default (``retrain_scope="all"``), so that the layers below can
    adapt too; with ``"upward"`` only the layers from the group's root on
    (earlier layers, and their BatchNorm statistics, stay fixed: the paper's rule).

After the last group, (c) *finetune*: the whole network trains with every mask
fixed. With a teacher (by default a frozen copy of the unpruned network) the
loss of (a), (b) and (c) is ``CE + weight * T^2 * KL`` to the teacher's outputs
(:func:`bnnslim.train.training_loss`).

Drive it step by step::

    schedule = PruneSchedule(model, example_inputs, keep=0.5, teacher=Teacher.copy_of(model))
    for group in schedule:          # the next undecided group, bottom-up
        schedule.select(loader)     # (a): decides and fixes the group's mask
        schedule.retrain(loader)    # (b)
    schedule.finetune(loader)       # (c)
    masks = schedule.close()        # masks by group (root conv name); the hooks come off

or in one call with :func:`learn_masks`. Every phase starts from RNG state
derived from ``(seed, phase)``, so a schedule restored with
:meth:`PruneSchedule.load_state_dict` continues exactly as an uninterrupted one
(``bnnslim prune --resume``, see ``stage.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnnslim import distributed as D
from bnnslim.binary.convert import forward_order
from bnnslim.errors import BnnslimError
from bnnslim.graph import build_graph
from bnnslim.modes import frozen
from bnnslim.plugin_types import SelectionContext, StrategySpec
from bnnslim.prune.budget import Budget
from bnnslim.prune.groups import PrunableGroup, find_groups
from bnnslim.prune.masking import MaskController
from bnnslim.train import SEED_STRIDE, Distillation, Teacher, as_teacher, train_step, training_loss

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LATENT_CLIP = 1.0  # latent weights clipped to [-1, 1] after every update (BinaryConnect), as binarize trains them
FINETUNE_PER_RETRAIN = 10  # default fine-tuning: as many steps as retraining ten groups (quick runs stay quick)
RETRAIN_SCOPES = ("all", "upward")  # (b) trains every layer, or the group's root and the layers after it


@dataclass(frozen=True)
class ScheduleConfig:
    """How the schedule prunes and trains (``bnnslim prune``'s options of the same names).

    ``finetune_steps`` (c) is on by default: ten times ``retrain_steps`` (1000
    steps with the defaults) unless given. ``retrain_scope`` is ``"all"`` by
    default: on the benchmark it ended VGG-11 0.2-0.5 points higher than the
    paper's ``"upward"`` and the small CNN level (the keep-1.0 control gains as
    much), for 10-15 % more time per run. Distillation (``distill`` weight,
    ``temperature``) is off by default: on the benchmark
    (``benchmarks/prune_accuracy.md``) a teacher that is the unpruned binary
    network cost accuracy at T = 2 and 4 and changed nothing at T = 1.
    """

    keep: float
    strategy: str = "subsidiary"
    budget: str = "filters"
    min_keep: float = 0.1
    round_to: int = 1
    max_shift: float = 0.25
    exclude: tuple[str, ...] = ()
    select_steps: int = 50
    select_lr: float = 0.005
    penalty: float = 1.0
    retrain_steps: int = 100
    retrain_scope: str = "all"
    lr: float = 2e-3
    finetune_steps: int | None = None  # None: FINETUNE_PER_RETRAIN x retrain_steps
    finetune_lr: float = 2e-3
    distill: float = 0.0
    temperature: float = 4.0
    seed: int = 0

    @property
    def finetune_budget(self) -> int:
        """Steps of (c): ``finetune_steps``, or by default ``FINETUNE_PER_RETRAIN`` x ``retrain_steps`` (1000)."""
        return FINETUNE_PER_RETRAIN * self.retrain_steps if self.finetune_steps is None else self.finetune_steps

    @property
    def distillation(self) -> Distillation:
        return Distillation(self.distill, self.temperature)


@dataclass
class GroupRecord:
    group: str
    producers: list[str]
    channels: int
    kept: int
    proposed: int
    suggested: int
    retrain_loss: float
    select_seconds: float = 0.0
    retrain_seconds: float = 0.0


@dataclass
class PruneEvent:
    """Progress: ``phase`` is "select", "retrain", "finetune" or "done" for group ``index`` of ``groups``."""

    phase: str
    index: int
    groups: int
    group: str
    step: int = 0
    steps: int = 0
    loss: float = 0.0
    accuracy: float = 0.0
    kept_filters: int = 0


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask keeping the ``k`` highest scores (ties: lower index first)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    mask = torch.zeros_like(scores)
    mask[order[:k]] = 1.0
    return mask


def retrain(model: nn.Module, group: PrunableGroup | None, order: dict[str, int], batches: Iterator, steps: int,
            lr: float, on_step: Callable[[int, float, float], None] | None = None,
            teacher: Teacher | None = None, distill: Distillation | None = None) -> float:
    """Train the layers from ``group``'s root upward (all layers when ``group`` is None).

    Earlier layers, and their BatchNorm statistics, stay fixed. Adam with a
    cosine schedule over ``steps``; the loss is :func:`bnnslim.train.training_loss`.
    Returns the last step's loss.
    """
    modules = dict(model.named_modules())
    upward = {n for n, i in order.items() if group is None or i >= group.order}
    trainable: list[nn.Parameter] = []
    loss_value = 0.0
    with frozen(model):
        model.train()
        for name, module in modules.items():
            if group is None:
                break
            if name in upward:
                trainable += module.parameters(recurse=False)
            elif not list(module.children()):
                module.eval()
        if group is None:
            trainable = list(model.parameters())
        for p in trainable:
            p.requires_grad_(True)
        use_teacher = teacher if distill is not None and distill.active else None
        if trainable and steps > 0:
            optimizer = torch.optim.Adam(trainable, lr=lr)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
            for step in range(steps):
                x, y = next(batches)
                loss_value, correct = train_step(model, x, y, optimizer, LATENT_CLIP, teacher=use_teacher,
                                                 distill=distill,
                                                 after_backward=lambda: D.average_gradients(trainable))
                scheduler.step()
                if on_step is not None:
                    on_step(step + 1, loss_value, correct / y.numel())
        D.average_buffers(model)  # BatchNorm statistics agree on every rank
    model.train()
    return loss_value


def _to_device(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> Iterator:
    for x, y in batches:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def stream(batches: Batches, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` on ``device`` forever: an iterator is read on; a re-iterable (a DataLoader) is cycled."""
    if isinstance(batches, Iterator):
        return _to_device(batches, device)

    def cycle() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            empty = True
            for x, y in batches:
                empty = False
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if empty:
                raise BnnslimError("the training loader yields no batches", "check the DataLoader and its dataset")

    return cycle()


class PruneSchedule:
    """The schedule on an in-memory model (module docstring); masks are installed as forward hooks.

    ``teacher``: a frozen network for distillation (``Teacher`` or ``nn.Module``),
    ``"copy"`` (a frozen copy of ``model`` as it is now, i.e. unpruned) or None
    (cross-entropy only). ``heldout``: one fixed batch for strategies that
    measure a loss (greedy); by default the first batch :meth:`select` sees.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, config: ScheduleConfig, *,
                 teacher: Teacher | nn.Module | str | None = "copy",
                 heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
                 device: torch.device | str | None = None,
                 on_event: Callable[[PruneEvent], None] | None = None,
                 strategy: StrategySpec | None = None,
                 after_phase: Callable[[PruneSchedule], None] | None = None) -> None:
        from bnnslim.plugins import get_strategy, guard_strategy

        if config.retrain_scope not in RETRAIN_SCOPES:
            raise BnnslimError(f"unknown --retrain-scope '{config.retrain_scope}'",
                               f"choose one of: {', '.join(RETRAIN_SCOPES)}")
        self.config = config
        self.model = model
        self.spec = get_strategy(config.strategy) if strategy is None else guard_strategy(strategy)
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        example = example_inputs.detach().to("cpu")
        model.to("cpu")
        graph = build_graph(model, example)
        scan = find_groups(model, graph, example, exclude=config.exclude)
        self.groups: list[PrunableGroup] = scan.groups
        if not self.groups:
            why = "; ".join(f"{k}: {v}" for k, v in list(scan.skipped.items())[:4]) or "no binary conv"
            raise BnnslimError(f"the model has no prunable group ({why})", "binarize more layers, or check --exclude")
        self.skipped = scan.skipped
        self.budget = Budget(self.groups, config.keep, config.min_keep, config.round_to, config.max_shift,
                             config.budget, model, example)
        if isinstance(teacher, str):
            if teacher != "copy":
                raise BnnslimError(f"unknown teacher '{teacher}'", "pass 'copy', an nn.Module or None")
            teacher = Teacher.copy_of(model) if config.distillation.active else None
        self.teacher = as_teacher(teacher) if config.distillation.active else None  # distill=0: no teacher runs
        if self.teacher is not None:
            self.teacher.to(self.device)
        self.distill = config.distillation if self.teacher is not None else None
        self.order = forward_order(model, example)
        model.to(self.device)
        self.controller = MaskController(model, self.groups)
        self.masks: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.records: list[GroupRecord] = []
        self.finetuned = False
        self.finetune_loss = 0.0
        self.heldout = heldout
        self.on_event = on_event
        self.after_phase = after_phase  # called after each retrain and after finetune (checkpoints)
        self._selected: int | None = None  # index of a group selected but not yet retrained

    # -- where the schedule stands ---------------------------------------------------------
    @property
    def index(self) -> int:
        """How many groups are finished (selected and retrained)."""
        return len(self.records)

    @property
    def done(self) -> bool:
        return self.index == len(self.groups) and (self.finetuned or self.config.finetune_budget == 0)

    def next_group(self) -> PrunableGroup | None:
        """The group that :meth:`select` decides next, or None after the last one."""
        i = self._selected if self._selected is not None else self.index
        return self.groups[i] if i < len(self.groups) else None

    def __iter__(self) -> Iterator[PrunableGroup]:
        while (group := self.next_group()) is not None:
            yield group
            if self.next_group() is group:
                raise BnnslimError(f"group {group.id} was not selected and retrained in the loop",
                                   "call schedule.select(...) and schedule.retrain(...) for every group")

    def _seed(self, phase: int) -> int:
        return self.config.seed * SEED_STRIDE + phase

    def _event(self, *args: Any, **kwargs: Any) -> None:
        if self.on_event is not None:
            self.on_event(PruneEvent(*args, **kwargs))

    # -- (a) select --------------------------------------------------------------------------
    def context(self, batches: Iterator, group: PrunableGroup, suggested: int) -> SelectionContext:
        """What the strategy sees for ``group`` (the teacher and the loss included)."""
        i = self.groups.index(group)
        if self.heldout is None:
            x, y = next(batches)
            self.heldout = (x, y)
        hx, hy = self.heldout
        distill = self.distill
        teacher = self.teacher

        def loss(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
            soft = teacher(x) if teacher is not None and x is not None and distill is not None else None
            return training_loss(logits, y, soft, distill)

        cfg = self.config
        return SelectionContext(model=self.model, group=group, masks=self.controller, suggested_keep=suggested,
                                batches=batches, heldout=(hx.to(self.device), hy.to(self.device)),
                                steps=cfg.select_steps, lr=cfg.select_lr, penalty=cfg.penalty,
                                generator=torch.Generator().manual_seed(self._seed(i)), device=self.device,
                                teacher=teacher.module if teacher is not None else None, loss=loss)

    def select(self, batches: Batches) -> torch.Tensor:
        """(a) for the next group: score its channels, decide the count, fix the mask; returns the mask."""
        if self._selected is not None:
            raise BnnslimError(f"group {self.groups[self._selected].id} is selected but not retrained",
                               "call schedule.retrain(...) before selecting the next group")
        i = self.index
        if i >= len(self.groups):
            raise BnnslimError("every group is decided", "call schedule.finetune(...) or schedule.close()")
        g = self.groups[i]
        started = time.perf_counter()
        torch.manual_seed(self._seed(i))
        it = stream(batches, self.device)
        self._batches = it
        suggested = self.budget.suggestion()
        self._event("select", i, len(self.groups), g.id, 0, self.config.select_steps, kept_filters=self.budget.kept)
        ctx = self.context(it, g, suggested)
        try:
            selection = self.spec.select(ctx)  # guarded: failures and invalid answers name the strategy
        finally:
            self.controller.clear(g.id)
        proposed = selection.keep if selection.keep is not None else suggested
        k = self.budget.choose(proposed)
        mask = top_k_mask(selection.scores, k)
        D.check_same_on_all_ranks({"mask": mask}, f"the masks of group {g.id}")
        self.masks[g.id] = mask
        self.controller.set_fixed(g.id, mask.to(self.device))
        for key, value in selection.state.items():
            self.state[f"{key}.{g.id}"] = value.detach().cpu()
        self._selected = i
        self._pending = GroupRecord(g.id, list(g.producers), g.size, k, proposed, suggested, 0.0,
                                    select_seconds=time.perf_counter() - started)
        return mask

    # -- (b) retrain ---------------------------------------------------------------------------
    def retrain(self, batches: Batches | None = None) -> float:
        """(b) for the group just selected: train every layer (from its root upward with
        ``retrain_scope="upward"``); returns the last loss.

        ``batches`` defaults to the stream :meth:`select` read from (so that the
        data order continues exactly).
        """
        if self._selected is None:
            raise BnnslimError("no group is selected", "call schedule.select(...) first")
        i = self._selected
        g = self.groups[i]
        started = time.perf_counter()
        it = self._batches if batches is None else stream(batches, self.device)

        def on_step(step: int, loss: float, acc: float) -> None:
            self._event("retrain", i, len(self.groups), g.id, step, self.config.retrain_steps, loss, acc,
                        self.budget.kept)

        from_group = None if self.config.retrain_scope == "all" else g  # None: every layer
        loss = retrain(self.model, from_group, self.order, it, self.config.retrain_steps, self.config.lr, on_step,
                       self.teacher, self.distill)
        record = self._pending
        record.retrain_loss = loss
        record.retrain_seconds = time.perf_counter() - started
        self.records.append(record)
        self._selected = None
        if self.after_phase is not None:
            self.after_phase(self)
        self._event("done", i, len(self.groups), g.id, kept_filters=self.budget.kept)
        return loss

    # -- (c) finetune ----------------------------------------------------------------------------
    def finetune(self, batches: Batches, steps: int | None = None) -> float:
        """(c) after the last group: the whole network trains, masks fixed; returns the last loss."""
        if self.index < len(self.groups) or self._selected is not None:
            raise BnnslimError(f"{len(self.groups) - self.index} groups are still undecided",
                               "select and retrain every group before finetuning")
        steps = self.config.finetune_budget if steps is None else steps
        n = len(self.groups)
        torch.manual_seed(self._seed(n))
        it = stream(batches, self.device)

        def on_step(step: int, loss: float, acc: float) -> None:
            self._event("finetune", n - 1, n, "all layers", step, steps, loss, acc, self.budget.kept)

        self.finetune_loss = retrain(self.model, None, self.order, it, steps, self.config.finetune_lr, on_step,
                                     self.teacher, self.distill)
        self.finetuned = True
        if self.after_phase is not None:
            self.after_phase(self)
        return self.finetune_loss

    # -- results, state, teardown ------------------------------------------------------------------
    @property
    def kept_filters(self) -> int:
        return self.budget.kept

    def layer_counts(self) -> dict[str, tuple[int, int]]:
        """Producer conv -> (filters before, after)."""
        counts = {}
        for g in self.groups:
            kept = int(self.masks[g.id].sum()) if g.id in self.masks else g.size
            for p in g.producers:
                counts[p] = (g.size, kept)
        return counts

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: weights, masks, strategy state, records (tensors + plain data)."""
        from dataclasses import asdict

        if self._selected is not None:
            raise BnnslimError("a group is selected but not retrained", "save after schedule.retrain(...)")
        return {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "masks": {k: v.clone() for k, v in self.masks.items()},
                "state": {k: v.clone() for k, v in self.state.items()},
                "records": [asdict(r) for r in self.records], "finetuned": self.finetuned,
                "finetune_loss": self.finetune_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (a fresh schedule on the same model and options)."""
        self.model.load_state_dict({k: v.to(self.device) for k, v in state["model"].items()}, strict=True)
        self.records = [GroupRecord(**r) for r in state["records"]]
        self.masks = {k: v.clone() for k, v in state["masks"].items()}
        self.state = dict(state["state"])
        self.budget.replay([r.kept for r in self.records])
        for gid, mask in self.masks.items():
            self.controller.set_fixed(gid, mask.to(self.device))
        self.finetuned = bool(state.get("finetuned", False))
        self.finetune_loss = float(state.get("finetune_loss", 0.0))

    def close(self) -> dict[str, torch.Tensor]:
        """Take the mask hooks off the model; returns the masks (group id -> 0/1 over the root's channels)."""
        self.controller.remove()
        return dict(self.masks)


def learn_masks(model: nn.Module, example_inputs: torch.Tensor, train_loader: Batches, keep: float,
                strategy: str = "subsidiary", teacher: Teacher | nn.Module | str | None = "copy", *,
                device: torch.device | str | None = None, heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
                on_event: Callable[[PruneEvent], None] | None = None, **options: Any) -> dict[str, torch.Tensor]:
    """Run the whole schedule on an in-memory binary ``model``; returns the masks by group.

    ``model`` (with ``BinaryConv2d`` layers, e.g. from ``bnnslim binarize`` or
    :func:`bnnslim.binary.convert.apply_binarization`) is retrained in place;
    afterwards it carries no hooks: apply the masks with
    :class:`bnnslim.prune.masking.MaskController` or slim it with
    :func:`bnnslim.prune.slim.slim`. ``train_loader`` is any re-iterable of ``(x, y)``;
    ``options`` are :class:`ScheduleConfig` fields (``select_steps``,
    ``finetune_steps``, ``budget="ops"``, ``distill=1.0`` ...). A ``teacher``
    network turns distillation on (weight 1 unless ``distill`` says otherwise);
    the default ``"copy"`` distils from a frozen copy of the unpruned model only
    when ``distill > 0``.

    >>> masks = learn_masks(model, torch.randn(2, 1, 28, 28), loader, keep=0.5)
    """
    if teacher is not None and not isinstance(teacher, str):
        options.setdefault("distill", 1.0)
    config = ScheduleConfig(keep=keep, strategy=strategy, **options)
    schedule = PruneSchedule(model, example_inputs, config, teacher=teacher, heldout=heldout, device=device,
                             on_event=on_event)
    try:
        for _ in schedule:
            schedule.select(train_loader)
            schedule.retrain()
        if config.finetune_budget > 0:
            schedule.finetune(train_loader)
    finally:
        masks = schedule.close()
    return masks


__all__ = ["RETRAIN_SCOPES", "GroupRecord", "PruneEvent", "PruneSchedule", "ScheduleConfig", "learn_masks", "retrain",
           "top_k_mask"]
