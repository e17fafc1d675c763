"""``bnnslim prune``: the layer-wise, bottom-up schedule of Xu et al. (CVPR 2019).

For each prunable group, in forward order (``groups.py``):

(a) *select*: the strategy scores the group's channels (the subsidiary strategy
    trains the group's selectors with the main network frozen);
    the budget (``budget.py``) turns its proposed count into an exact one and the
    top-k scores are kept; that 0/1 mask is fixed from then on;
(b) *retrain*: the main network's layers from the group's root upward are
    trained with all decided masks applied (earlier layers, and their BatchNorm
    statistics, stay fixed).

After every group the state (weights, masks, selectors, decisions) is written
to ``checkpoints/prune.safetensors``; ``--resume`` continues after the last
finished group. Every group starts from RNG state derived from ``(seed, group
index)`` and a fresh optimizer, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from bnnslim import distributed as D
from bnnslim._atomic import save_tensors
from bnnslim.binarize import resolve_device
from bnnslim.binary.convert import clip_latent_weights, forward_order
from bnnslim.errors import BnnslimError
from bnnslim.graph import build_graph
from bnnslim.plugin_types import Selection, SelectionContext, StrategySpec
from bnnslim.plugins import get_dataset, get_strategy
from bnnslim.prune.budget import Budget
from bnnslim.prune.groups import PrunableGroup, find_groups
from bnnslim.prune.masking import MaskController
from bnnslim.run_model import load_run_model
from bnnslim.rundir import RunDir, save_weights
from bnnslim.train import evaluate, make_loader

PRUNED_WEIGHTS = "pruned.safetensors"
CHECKPOINT = "prune.safetensors"


@dataclass(frozen=True)
class PruneOptions:
    """Options of ``bnnslim prune`` (see the CLI for their meaning)."""

    keep: float
    strategy: str = "subsidiary"
    data: str | None = None
    data_root: str | None = None
    min_keep: float = 0.1
    round_to: int = 1
    exclude: tuple[str, ...] = ()
    select_steps: int = 50
    select_lr: float = 0.005
    penalty: float = 1.0
    max_shift: float = 0.5
    retrain_steps: int = 100
    lr: float = 5e-4
    batch_size: int = 128
    heldout: int = 128
    seed: int = 0
    device: str = "cpu"

    def resume_key(self) -> str:
        """What must not change between an interrupted run and its --resume."""
        d = asdict(self)
        d.pop("device")
        return json.dumps(d, sort_keys=True)


@dataclass
class GroupRecord:
    group: str
    producers: list[str]
    channels: int
    kept: int
    proposed: int
    suggested: int
    retrain_loss: float


@dataclass
class PruneEvent:
    """Progress: ``phase`` is "select", "retrain" or "done" for group ``index`` of ``groups``."""

    phase: str
    index: int
    groups: int
    group: str
    step: int = 0
    steps: int = 0
    loss: float = 0.0
    accuracy: float = 0.0
    kept_filters: int = 0


@dataclass
class PruneResult:
    groups: list[PrunableGroup]
    records: list[GroupRecord]
    masks: dict[str, torch.Tensor]
    total_filters: int
    requested_filters: int
    kept_filters: int
    accuracy_before: float
    accuracy_after: float
    seconds: float
    resumed_after: int = 0
    layer_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (before, after)


def _batches(dataset: Dataset, batch_size: int, seed: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        for x, y in make_loader(dataset, batch_size, seed, epoch, shuffle=True):
            yield x.to(device), y.to(device)
        epoch += 1


def _split_heldout(train: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset]:
    n = len(train)  # type: ignore[arg-type]
    size = min(size, max(1, n // 10))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(train, perm[size:]), Subset(train, perm[:size])


def validate_selection(selection: Any, spec: StrategySpec, group: PrunableGroup) -> Selection:
    where = f"strategy '{spec.name}' on group {group.id}"
    if not isinstance(selection, Selection):
        raise BnnslimError(f"{where} returned {type(selection).__name__}, not a Selection", "fix the strategy plugin")
    scores = torch.as_tensor(selection.scores).detach().flatten().float().cpu()
    if scores.numel() != group.size:
        raise BnnslimError(f"{where} returned {scores.numel()} scores for {group.size} channels",
                           "return one score per channel of the group's root")
    if not torch.isfinite(scores).all():
        raise BnnslimError(f"{where} returned non-finite scores", "fix the strategy plugin")
    if selection.keep is not None and not 0 <= int(selection.keep) <= group.size:
        raise BnnslimError(f"{where} proposed keeping {selection.keep} of {group.size} channels",
                           "propose a count between 0 and the group's size, or None")
    return Selection(scores=scores, keep=None if selection.keep is None else int(selection.keep),
                     state=dict(selection.state))


def shifted(proposed: int, suggested: int, max_shift: float, size: int) -> int:
    """The proposal, kept within ``max_shift`` (a fraction) of the group's uniform share.

    Learned proposals that run far above or below the share would leave the last
    groups to absorb the difference; this bound spreads it.
    """
    low, high = round(suggested * (1 - max_shift)), round(suggested * (1 + max_shift))
    return max(0, min(size, max(low, min(high, proposed))))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask keeping the ``k`` highest scores (ties: lower index first)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    mask = torch.zeros_like(scores)
    mask[order[:k]] = 1.0
    return mask


def retrain(model: nn.Module, group: PrunableGroup, order: dict[str, int], batches: Iterator, steps: int,
            lr: float, on_step: Callable[[int, float, float], None] | None = None) -> float:
    """Train the layers from ``group``'s root upward; earlier layers (and their BN statistics) stay fixed."""
    modules = dict(model.named_modules())
    upward = {n for n, i in order.items() if i >= group.order}
    trainable: list[nn.Parameter] = []
    frozen_state = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    for name, module in modules.items():
        if name in upward:
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
                trainable.append(p)
        elif not list(module.children()):
            module.eval()
    loss_value = 0.0
    try:
        if trainable and steps > 0:
            optimizer = torch.optim.Adam(trainable, lr=lr)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
            for step in range(steps):
                x, y = next(batches)
                optimizer.zero_grad(set_to_none=True)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                loss.backward()
                D.average_gradients(trainable)
                optimizer.step()
                scheduler.step()
                clip_latent_weights(model)
                loss_value = loss.item()
                if on_step is not None:
                    on_step(step + 1, loss_value, float((logits.argmax(1) == y).float().mean()))
        D.average_buffers(model)  # BatchNorm statistics agree on every rank
    finally:
        for p, flag in frozen_state:
            p.requires_grad_(flag)
        model.train()
    return loss_value


def _layer_counts(groups: list[PrunableGroup], masks: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    counts = {}
    for g in groups:
        kept = int(masks[g.id].sum()) if g.id in masks else g.size
        for p in g.producers:
            counts[p] = (g.size, kept)
    return counts


def prune(run_path: Path, opts: PruneOptions, resume: bool = False,
          on_event: Callable[[PruneEvent], None] | None = None) -> PruneResult:
    """Run the layer-wise schedule on the run directory's binary model (module docstring)."""
    started = time.perf_counter()
    run = RunDir(Path(run_path))
    loaded = load_run_model(run)
    manifest = loaded.manifest
    spec = get_strategy(opts.strategy)
    data_name = opts.data or (manifest.get("dataset") or {}).get("name")
    if not data_name:
        raise BnnslimError("no dataset: the run was binarized without --data", "give --data NAME (and --data-root)")
    data_root = opts.data_root if opts.data else (manifest.get("dataset") or {}).get("root")
    if not 0.0 < opts.keep <= 1.0:
        raise BnnslimError(f"--keep {opts.keep} is outside (0, 1]", "give the fraction of filters to keep, e.g. 0.8")
    model = loaded.model
    example = loaded.example()
    graph = build_graph(model, example)
    scan = find_groups(model, graph, example, exclude=opts.exclude)
    groups = scan.groups
    if not groups:
        why = "; ".join(f"{k}: {v}" for k, v in list(scan.skipped.items())[:4]) or "no binary conv"
        raise BnnslimError(f"the model has no prunable group ({why})",
                           "binarize more layers, or check --exclude")
    budget = Budget(groups, opts.keep, opts.min_keep, opts.round_to)
    dataset = get_dataset(data_name).build(Path(data_root) if data_root else None)
    device = resolve_device(opts.device)
    checkpoint_path = run.checkpoints / CHECKPOINT
    masks: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    records: list[GroupRecord] = []
    start = 0
    if resume:
        start, records, masks, state, accuracy_before = _load_checkpoint(checkpoint_path, model, opts)
        budget.replay([r.kept for r in records])
    model.to(device)
    if not resume:
        accuracy_before = evaluate(model, dataset.test, device).accuracy
    controller = MaskController(model, groups)
    for gid, mask in masks.items():
        controller.set_fixed(gid, mask.to(device))
    train_set, heldout_set = _split_heldout(dataset.train, opts.heldout, opts.seed)
    hx, hy = next(iter(DataLoader(heldout_set, batch_size=len(heldout_set))))  # type: ignore[arg-type]  # same on every rank
    order = forward_order(model, example.to(device))
    try:
        for i in range(start, len(groups)):
            g = groups[i]
            torch.manual_seed(opts.seed * 1_000_003 + i)
            batches = _batches(train_set, opts.batch_size, opts.seed * 1_000_003 + i, device)
            suggested = budget.suggestion()
            if on_event:
                on_event(PruneEvent("select", i, len(groups), g.id, 0, opts.select_steps, kept_filters=budget.kept))
            ctx = SelectionContext(model=model, group=g, masks=controller, suggested_keep=suggested, batches=batches,
                                   heldout=(hx.to(device), hy.to(device)), steps=opts.select_steps,
                                   lr=opts.select_lr, penalty=opts.penalty,
                                   generator=torch.Generator().manual_seed(opts.seed * 1_000_003 + i), device=device)
            try:
                raw = spec.select(ctx)
            except BnnslimError:
                raise
            except Exception as exc:
                raise BnnslimError(f"strategy '{spec.name}' failed on group {g.id}: {type(exc).__name__}: {exc}",
                                   "fix the strategy plugin or choose another --strategy") from exc
            finally:
                controller.clear(g.id)
            selection = validate_selection(raw, spec, g)
            proposed = selection.keep if selection.keep is not None else suggested
            k = budget.choose(shifted(proposed, suggested, opts.max_shift, g.size))
            masks[g.id] = top_k_mask(selection.scores, k)
            D.check_same_on_all_ranks({"mask": masks[g.id]}, f"the masks of group {g.id}")
            controller.set_fixed(g.id, masks[g.id].to(device))
            for key, value in selection.state.items():
                state[f"{key}.{g.id}"] = value.detach().cpu()

            def on_step(step: int, loss: float, acc: float, i: int = i, g: PrunableGroup = g) -> None:
                if on_event:
                    on_event(PruneEvent("retrain", i, len(groups), g.id, step, opts.retrain_steps, loss, acc,
                                        budget.kept))

            loss = retrain(model, g, order, batches, opts.retrain_steps, opts.lr, on_step)
            records.append(GroupRecord(g.id, list(g.producers), g.size, k, proposed, suggested, loss))
            if D.is_main_process():
                _save_checkpoint(checkpoint_path, model, masks, state, records, opts, accuracy_before)
            D.barrier()
            if on_event:
                on_event(PruneEvent("done", i, len(groups), g.id, kept_filters=budget.kept))
        accuracy_after = evaluate(model, dataset.test, device).accuracy
        D.check_same_on_all_ranks({**model.state_dict(), **masks}, "retrained weights and masks")
    finally:
        controller.remove()
        model.to("cpu")
    result = PruneResult(groups=groups, records=records, masks=masks, total_filters=budget.total,
                         requested_filters=budget.requested, kept_filters=budget.kept,
                         accuracy_before=accuracy_before, accuracy_after=accuracy_after,
                         seconds=time.perf_counter() - started, resumed_after=start,
                         layer_counts=_layer_counts(groups, masks))
    if D.is_main_process():
        _write_result(run, model, result, opts, state, data_name, data_root)
    D.barrier()
    return result


def _save_checkpoint(path: Path, model: nn.Module, masks: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                     records: list[GroupRecord], opts: PruneOptions, accuracy_before: float) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"mask.{k}": v.cpu() for k, v in masks.items()})
    tensors.update({f"state.{k}": v for k, v in state.items()})
    save_tensors(path, tensors, {"options": opts.resume_key(), "done": str(len(records)),
                                 "records": json.dumps([asdict(r) for r in records]),
                                 "accuracy_before": repr(accuracy_before)})


def _load_checkpoint(path: Path, model: nn.Module, opts: PruneOptions) -> tuple[
        int, list[GroupRecord], dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise BnnslimError(f"nothing to resume: no prune checkpoint at '{path}'", "run without --resume")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise BnnslimError(f"the prune checkpoint '{path}' is damaged ({exc})", "run without --resume") from exc
    if meta.get("options") != opts.resume_key():
        raise BnnslimError("--resume with different options than the interrupted run",
                           f"repeat the first run's options: {meta.get('options')}")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    masks = {k[5:]: v for k, v in tensors.items() if k.startswith("mask.")}
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("state.")}
    records = [GroupRecord(**r) for r in json.loads(meta["records"])]
    return int(meta["done"]), records, masks, state, float(meta["accuracy_before"])


def _write_result(run: RunDir, model: nn.Module, result: PruneResult, opts: PruneOptions,
                  state: dict[str, torch.Tensor], data_name: str, data_root: str | None) -> None:
    extra = {f"mask.{k}": v for k, v in result.masks.items()}
    extra.update({f"state.{k}": v for k, v in state.items()})
    save_weights(run.path / PRUNED_WEIGHTS, model, kind="binary-latent-masked", extra=extra)
    run.update_manifest(prune={
        "strategy": opts.strategy, "keep": opts.keep, "options": json.loads(opts.resume_key()),
        "dataset": {"name": data_name, "root": data_root},
        "counted": "output filters of the binary convs that produce prunable groups",
        "filters_total": result.total_filters, "filters_requested": result.requested_filters,
        "filters_kept": result.kept_filters,
        "groups": [asdict(r) for r in result.records],
        "layers": {k: {"before": b, "after": a} for k, (b, a) in result.layer_counts.items()},
        "accuracy_before": result.accuracy_before, "accuracy_after": result.accuracy_after,
        "seconds": round(result.seconds, 2), "weights": PRUNED_WEIGHTS,
    })
