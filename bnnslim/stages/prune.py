"""``bnnslim prune``: the schedule of ``schedule.py`` on a run directory.

This layer owns what the in-memory schedule does not: the run's model and
dataset, the seeded data streams, the held-out batch, the teacher (the run's
unpruned binary network, ``binary.safetensors``, frozen; or, with ``--teacher
FILE``, the float model the run was binarized from, with those weights),
checkpoints and the manifest. After every group, and after the final fine-tuning, the schedule's
state (weights, masks, selectors, decisions) is written to
``checkpoints/prune.safetensors``; ``--resume`` continues after the last
finished phase. Every phase starts from RNG state derived from ``(seed, phase)``
and a fresh optimizer, and each group's data stream from ``(seed, group)``, so a
resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from bnnslim import distributed as D
from bnnslim._atomic import save_tensors
from bnnslim.checks import dead_model_check
from bnnslim.errors import BnnslimError
from bnnslim.plugins import get_dataset, provenance, recorded_plugin
from bnnslim.prune.groups import PrunableGroup
from bnnslim.prune.schedule import GroupRecord, PruneEvent, PruneSchedule, ScheduleConfig
from bnnslim.run_model import RunModel, load_run_model
from bnnslim.rundir import RunDir, save_weights
from bnnslim.stages.binarize import load_weights_into, named_float_teacher, resolve_device
from bnnslim.train import SEED_STRIDE, Teacher, evaluate, make_loader

PRUNED_WEIGHTS = "pruned.safetensors"
CHECKPOINT = "prune.safetensors"


@dataclass(frozen=True)
class PruneOptions(ScheduleConfig):
    """Options of ``bnnslim prune`` (see the CLI for their meaning): the schedule's, and where data comes from."""

    data: str | None = None
    data_root: str | None = None
    batch_size: int = 128
    heldout: int = 128
    device: str = "cpu"
    #: float weights of the model the run was binarized from (its float twin): the distillation teacher
    #: instead of the unpruned binary network (``--teacher FILE``; needs ``distill > 0``)
    teacher: str | None = None

    def schedule_config(self) -> ScheduleConfig:
        return ScheduleConfig(**{f.name: getattr(self, f.name) for f in fields(ScheduleConfig)})

    def resume_key(self) -> str:
        """What must not change between an interrupted run and its --resume."""
        d = asdict(self)
        d.pop("device")
        return json.dumps(d, sort_keys=True)


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
    budget: dict[str, object] = field(default_factory=dict)  # measure, total, target, kept
    finetune_seconds: float = 0.0
    unprunable: dict[str, str] = field(default_factory=dict)  # binary conv kept whole -> why
    warnings: list[str] = field(default_factory=list)  # dead-model checks on the pruned model (checks.py)


def _batches(dataset: Dataset, batch_size: int, seed: int,
             device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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


def teacher_description(opts: PruneOptions) -> dict[str, object] | None:
    """What identifies the prune teacher (manifest, checkpoint; None: no distillation); checks ``--teacher``."""
    if opts.teacher is not None and opts.distill <= 0:
        raise BnnslimError("--teacher names a teacher but distillation is off (--distill 0)",
                           "give --distill w > 0, or drop --teacher")
    if opts.distill <= 0:
        return None
    loss = {"weight": opts.distill, "temperature": opts.temperature}
    if opts.teacher is None:
        return {"network": "the unpruned binary network of this run (binary.safetensors), frozen", **loss}
    return {**named_float_teacher(Path(opts.teacher)), **loss}


def _teacher(opts: PruneOptions, loaded: RunModel) -> Teacher | None:
    """The frozen teacher: the float twin with ``opts.teacher``'s weights, else the unpruned binary network."""
    if opts.distill <= 0:
        return None
    if opts.teacher is None:
        return Teacher.copy_of(loaded.model)  # binary.safetensors, frozen
    info = loaded.manifest["model"]
    twin = loaded.source.build(num_classes=info.get("num_classes"), in_channels=info.get("in_channels"))
    try:
        load_weights_into(twin, Path(opts.teacher))
    except BnnslimError as exc:
        raise BnnslimError(f"teacher: {exc.problem}", "give float weights of the model this run was binarized "
                           "from (binarize --teacher-epochs saves them as teacher.safetensors in the run)") from exc
    return Teacher(twin)


def loss_description(opts: ScheduleConfig) -> str:
    if opts.distill > 0:
        return f"cross-entropy + {opts.distill:g} * T^2 * KL(teacher || student) at T = {opts.temperature:g}"
    return "cross-entropy"


def prune(run_path: Path, opts: PruneOptions, resume: bool = False,
          on_event: Callable[[PruneEvent], None] | None = None) -> PruneResult:
    """Run the layer-wise schedule on the run directory's binary model (module docstring)."""
    started = time.perf_counter()
    run = RunDir(Path(run_path))
    loaded = load_run_model(run)
    manifest = loaded.manifest
    data_name = opts.data or (manifest.get("dataset") or {}).get("name")
    if not data_name:
        raise BnnslimError("no dataset: the run was binarized without --data", "give --data NAME (and --data-root)")
    data_root = opts.data_root if opts.data else (manifest.get("dataset") or {}).get("root")
    if not 0.0 < opts.keep <= 1.0:
        raise BnnslimError(f"--keep {opts.keep} is outside (0, 1]", "give the fraction of filters to keep, e.g. 0.8")
    from bnnslim.plugins import get_strategy

    spec = get_strategy(opts.strategy)
    model = loaded.model
    example = loaded.example()
    device = resolve_device(opts.device)
    checkpoint_path = run.checkpoints / CHECKPOINT
    if resume and not checkpoint_path.is_file():
        raise BnnslimError(f"nothing to resume: no prune checkpoint at '{checkpoint_path}'", "run without --resume")
    teacher_info = teacher_description(opts)
    teacher = _teacher(opts, loaded)
    accuracy_before = 0.0
    schedule = PruneSchedule(model, example, opts.schedule_config(), teacher=teacher, device=device,
                             on_event=on_event, strategy=spec,
                             after_phase=lambda s: _checkpoint(checkpoint_path, s, opts, teacher_info,
                                                               accuracy_before))
    root = Path(data_root) if data_root else None
    dataset = get_dataset(data_name, recorded_plugin(manifest, "dataset")).splits_for(root, loaded.input_shape)
    train_set, heldout_set = _split_heldout(dataset.train, opts.heldout, opts.seed)
    hx, hy = next(iter(DataLoader(heldout_set, batch_size=len(heldout_set))))  # type: ignore[arg-type]  # same on every rank
    schedule.heldout = (hx.to(device), hy.to(device))
    groups = schedule.groups
    start = 0
    try:
        if resume:
            state, accuracy_before = _load_checkpoint(checkpoint_path, opts, teacher_info)
            schedule.load_state_dict(state)
            start = schedule.index
        else:
            accuracy_before = evaluate(model, dataset.test, device).accuracy
        for i in range(schedule.index, len(groups)):
            batches = _batches(train_set, opts.batch_size, opts.seed * SEED_STRIDE + i, device)
            schedule.select(batches)
            schedule.retrain()
        finetune_started = time.perf_counter()
        if opts.finetune_budget > 0 and not schedule.finetuned:
            n = len(groups)
            schedule.finetune(_batches(train_set, opts.batch_size, opts.seed * SEED_STRIDE + n, device))
        finetune_seconds = time.perf_counter() - finetune_started
        masks = dict(schedule.masks)
        accuracy_after = evaluate(model, dataset.test, device).accuracy  # with the masks applied
        warnings = dead_model_check(model, hx.to(device), accuracy_after, manifest["model"].get("num_classes"))
        D.check_same_on_all_ranks({**model.state_dict(), **masks}, "retrained weights and masks")
    finally:
        schedule.close()
        model.to("cpu")
    budget = schedule.budget
    result = PruneResult(groups=groups, records=schedule.records, masks=masks,
                         total_filters=sum(g.filters for g in groups),
                         requested_filters=budget.requested if budget.measure == "filters" else budget.kept,
                         kept_filters=budget.kept, accuracy_before=accuracy_before, accuracy_after=accuracy_after,
                         seconds=time.perf_counter() - started, resumed_after=start,
                         layer_counts=schedule.layer_counts(), finetune_seconds=finetune_seconds,
                         unprunable=dict(schedule.skipped), warnings=warnings,
                         budget={"measure": budget.measure, "total": budget.total, "requested": budget.requested,
                                 "kept": budget.spent, "uniform_fraction": round(budget.fraction, 6)})
    if D.is_main_process():
        _write_result(run, model, result, opts, teacher_info, schedule.state, data_name, data_root)
    D.barrier()
    return result


def _checkpoint(path: Path, schedule: PruneSchedule, opts: PruneOptions, teacher: dict[str, object] | None,
                accuracy_before: float) -> None:
    if D.is_main_process():
        state = schedule.state_dict()
        tensors = {f"model.{k}": v for k, v in state["model"].items()}
        tensors.update({f"mask.{k}": v.cpu() for k, v in state["masks"].items()})
        tensors.update({f"state.{k}": v for k, v in state["state"].items()})
        save_tensors(path, tensors, {"options": opts.resume_key(), "done": str(len(state["records"])),
                                     "records": json.dumps(state["records"]),
                                     "finetuned": json.dumps(state["finetuned"]),
                                     "finetune_loss": repr(state["finetune_loss"]),
                                     "teacher": json.dumps(teacher, sort_keys=True),
                                     "accuracy_before": repr(accuracy_before)})
    D.barrier()


#: options added after prune checkpoints were first written, and what runs before them did (the paper's rule)
OPTIONS_BEFORE_THEY_EXISTED: dict[str, object] = {"retrain_scope": "upward"}


def _changed_options(first: dict[str, object], now: dict[str, object]) -> list[tuple[str, str, str, str]]:
    """(option, first run's value, value now, the flags that repeat the first run) for each that differs."""
    first = {**OPTIONS_BEFORE_THEY_EXISTED, **first}
    changes = []
    for key in sorted(first.keys() | now.keys()):
        was, is_now = first.get(key), now.get(key)
        if was == is_now:
            continue
        flag = "--" + key.replace("_", "-")
        if was is None or was == []:
            fix = f"no {flag}"
        elif isinstance(was, list):
            fix = " ".join(f"{flag} {v}" for v in was)
        else:
            fix = f"{flag} {was}"
        changes.append((key, json.dumps(was), json.dumps(is_now), fix))
    return changes


def _load_checkpoint(path: Path, opts: PruneOptions,
                     teacher: dict[str, object] | None) -> tuple[dict[str, object], float]:
    from bnnslim.rundir import read_checkpoint

    meta, tensors = read_checkpoint(path, ("options", "records", "accuracy_before"))
    changes = _changed_options(json.loads(meta["options"]), json.loads(opts.resume_key()))
    if changes:
        raise BnnslimError("--resume with different options than the interrupted run: "
                           + ", ".join(f"{key} was {was}, now {now}" for key, was, now, _ in changes),
                           "repeat the first run's options (" + " ".join(fix for *_, fix in changes)
                           + "), or run without --resume")
    if "teacher" in meta and meta["teacher"] != json.dumps(teacher, sort_keys=True):  # e.g. the file changed
        raise BnnslimError("--resume with another teacher than the interrupted run (the weights file differs)",
                           "give the first run's teacher weights, or run without --resume")
    try:
        state = {"model": {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                 "masks": {k[5:]: v for k, v in tensors.items() if k.startswith("mask.")},
                 "state": {k[6:]: v for k, v in tensors.items() if k.startswith("state.")},
                 "records": json.loads(meta["records"]), "finetuned": json.loads(meta.get("finetuned", "false")),
                 "finetune_loss": float(meta.get("finetune_loss", "0.0"))}
        return state, float(meta["accuracy_before"])
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise BnnslimError(f"the prune checkpoint '{path}' is damaged ({exc})", "run without --resume") from exc


def _write_result(run: RunDir, model: torch.nn.Module, result: PruneResult, opts: PruneOptions,
                  teacher: dict[str, object] | None, state: dict[str, torch.Tensor], data_name: str,
                  data_root: str | None) -> None:
    extra = {f"mask.{k}": v for k, v in result.masks.items()}
    extra.update({f"state.{k}": v for k, v in state.items()})
    save_weights(run.path / PRUNED_WEIGHTS, model, kind="binary-latent-masked", extra=extra)
    run.update_manifest(prune={
        "strategy": opts.strategy, "keep": opts.keep, "options": json.loads(opts.resume_key()),
        "strategy_plugin": provenance("strategy", opts.strategy),
        "dataset": {"name": data_name, "root": data_root},
        "counted": "output filters of the binary convs that produce prunable groups",
        "budget": result.budget,
        "teacher": teacher, "loss": loss_description(opts),
        "retrain_steps": opts.retrain_steps, "retrain_scope": opts.retrain_scope,
        "finetune_steps": opts.finetune_budget,
        "filters_total": result.total_filters, "filters_requested": result.requested_filters,
        "filters_kept": result.kept_filters,
        "unprunable": result.unprunable, "warnings": result.warnings,
        "groups": [asdict(r) for r in result.records],
        "layers": {k: {"before": b, "after": a} for k, (b, a) in result.layer_counts.items()},
        "accuracy_before": result.accuracy_before, "accuracy_after": result.accuracy_after,
        "seconds": round(result.seconds, 2), "weights": PRUNED_WEIGHTS,
    })
