"""``bnnslim prune --keep F``: learn which filters to keep, layer by layer."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bnnslim.cli._common import DEFAULT_RUN, RunOption, console, friendly_errors, locks_run
from bnnslim.errors import BnnslimWarning


@friendly_errors
@locks_run("prune")
def prune_command(
    keep: Annotated[float, typer.Option(help="Fraction of the prunable binary filters to keep, in (0, 1].")],
    run: RunOption = DEFAULT_RUN,
    strategy: Annotated[str, typer.Option(help="subsidiary (learned, default), l1, alpha, bn, random, greedy, or a plugin's.")] = "subsidiary",
    data: Annotated[str | None, typer.Option(help="Dataset (default: the one the run was trained on).")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Where the dataset lives.")] = None,
    min_keep: Annotated[float, typer.Option(min=0.0, max=1.0, help="Floor: every group keeps at least this fraction (and 1 filter).")] = 0.1,
    round_to: Annotated[int, typer.Option(min=1, help="Keep channel counts multiples of N (or the full count).")] = 1,
    exclude: Annotated[list[str] | None, typer.Option(help="Never prune layers matching this name pattern (repeatable).")] = None,
    select_steps: Annotated[int, typer.Option(min=0, help="Steps of selector learning per group (step a).")] = 50,
    select_lr: Annotated[float, typer.Option(min=0.0, help="Selector step size (about how far a typical selector moves per step).")] = 0.005,
    penalty: Annotated[float, typer.Option(min=0.0, help="Weight of the budget-aware penalty (1 = calibrated per group).")] = 1.0,
    max_shift: Annotated[float, typer.Option(min=0.0, help="Every group keeps within this fraction of its uniform share (0: uniform split).")] = 0.25,
    budget: Annotated[str, typer.Option(help="What --keep counts: filters, ops (binary operations) or params, as the export report counts them.")] = "filters",
    retrain_steps: Annotated[int, typer.Option(min=0, help="Steps of retraining per group (step b).")] = 100,
    retrain_scope: Annotated[str, typer.Option(help="Layers trained in step b: all, or upward (the group and the layers after it: the paper's rule).")] = "all",
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate when retraining.")] = 2e-3,
    finetune_steps: Annotated[int | None, typer.Option(min=0, help="Steps of whole-network fine-tuning after the last group, masks fixed (step c); default 10 x --retrain-steps.")] = None,
    finetune_lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate when fine-tuning.")] = 2e-3,
    distill: Annotated[float | None, typer.Option(min=0.0, help="Weight of distillation (CE + w T^2 KL); 0 = off. Default: 1 with --teacher, else 0.")] = None,
    teacher: Annotated[Path | None, typer.Option(help="Distil from the float model with these weights (e.g. the binarize run's teacher.safetensors) instead of the unpruned binary network.")] = None,
    temperature: Annotated[float, typer.Option(min=0.01, help="Distillation temperature T.")] = 4.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size.")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    resume: Annotated[bool, typer.Option(help="Continue after the last finished group of an interrupted run.")] = False,
) -> None:
    """Learn a filter selection for every prunable group, bottom-up, retrain after each, then fine-tune (Xu et al., CVPR 2019)."""
    from bnnslim.distributed import init_from_env
    from bnnslim.stages.prune import PruneOptions, prune

    device = init_from_env(device)

    opts = PruneOptions(keep=keep, strategy=strategy, data=data, data_root=str(data_root) if data_root else None,
                        min_keep=min_keep, round_to=round_to, exclude=tuple(exclude or ()),
                        select_steps=select_steps, select_lr=select_lr, penalty=penalty, max_shift=max_shift,
                        budget=budget, retrain_steps=retrain_steps, retrain_scope=retrain_scope, lr=lr,
                        finetune_steps=finetune_steps, finetune_lr=finetune_lr, temperature=temperature,
                        distill=distill if distill is not None else (1.0 if teacher is not None else 0.0),
                        teacher=str(teacher) if teacher is not None else None,
                        batch_size=batch_size, seed=seed, device=device)
    with Progress(TextColumn("[bold]{task.fields[group]}"), TextColumn("{task.fields[phase]}"), BarColumn(),
                  MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.0%}"),
                  TextColumn("kept {task.fields[kept]}"), TimeElapsedColumn(), console=console,
                  transient=True, disable=console.quiet) as progress:
        overall = progress.add_task("groups", total=None, group="groups", phase="", loss=0.0, acc=0.0, kept="")
        step_task = progress.add_task("step", total=None, group="", phase="", loss=0.0, acc=0.0, kept="")

        def on_event(ev):
            progress.update(overall, total=ev.groups, completed=ev.index + (ev.phase == "done"),
                            kept=str(ev.kept_filters))
            if ev.phase == "done":
                progress.console.print(f"group {ev.index + 1}/{ev.groups} {ev.group}: done, "
                                       f"{ev.kept_filters} filters kept so far")
                return
            progress.update(step_task, group=ev.group, phase=ev.phase, completed=ev.step, total=ev.steps,
                            loss=ev.loss, acc=ev.accuracy, kept=str(ev.kept_filters))

        result = prune(run, opts, resume=resume, on_event=on_event)

    table = Table(title=f"bnnslim prune --keep {keep} --strategy {strategy}")
    for col in ("layer", "filters before", "after", "kept"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for layer, (before, after) in result.layer_counts.items():
        table.add_row(layer, str(before), str(after), f"{after / before:.0%}")
    table.add_section()
    table.add_row("total", str(result.total_filters), str(result.kept_filters),
                  f"{result.kept_filters / result.total_filters:.1%}", style="bold")
    console.print(table)
    measure = result.budget.get("measure", "filters")
    total, kept = float(result.budget.get("total", 0) or 0), float(result.budget.get("kept", 0) or 0)  # type: ignore[arg-type]
    if measure != "filters":
        what = "binary operations" if measure == "ops" else "parameters"
        console.print(f"{what} per image: {total:,.0f} before, {kept:,.0f} after "
                      f"({kept / total:.1%}; asked for {keep:.1%})")
    elif result.kept_filters != result.requested_filters:
        console.print(f"[yellow]note[/]: {result.requested_filters} filters were requested; "
                      f"{result.kept_filters} is the nearest count the layer sizes allow")
    console.print(f"test accuracy: {result.accuracy_before:.2%} before, [bold]{result.accuracy_after:.2%}[/] after "
                  f"({result.seconds:.1f} s)")
    if result.unprunable:
        whole = "; ".join(f"{name} ({why})" for name, why in result.unprunable.items())
        console.print(f"kept whole (not prunable): {whole}", highlight=False)
    for message in result.warnings:  # issue 12: a dead model or one at chance is said so, as a warning line
        warnings.warn(message, BnnslimWarning, stacklevel=1)
