"""``bnnslim binarize MODEL.py``: convert (and with --data, train) the binary main network."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bnnslim.cli._common import DEFAULT_RUN, RunOption, console, friendly_errors, locks_run


@friendly_errors
@locks_run("binarize")
def binarize_command(
    model: Annotated[str, typer.Argument(help="Model file, FILE.py or FILE.py:NAME (see README: loading a model).")],
    run: RunOption = DEFAULT_RUN,
    data: Annotated[str | None, typer.Option(help="Dataset to train on (see `bnnslim info --datasets`). Without it: convert only.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Where the dataset lives (for datasets that need files).")] = None,
    scheme: Annotated[str, typer.Option(help="Binarization scheme: xnor, sign, bireal, or one from a plugin.")] = "xnor",
    real: Annotated[list[str] | None, typer.Option(help="Keep convs matching this name pattern real (repeatable).")] = None,
    binary: Annotated[list[str] | None, typer.Option(help="Make convs matching this pattern binary, even first/last (repeatable).")] = None,
    binarize_first_last: Annotated[bool, typer.Option("--binarize-first-last", help="Binarize the first and last layers too.")] = False,
    input_shape: Annotated[str | None, typer.Option(help="Input shape without batch, e.g. 3,32,32.")] = None,
    weights: Annotated[Path | None, typer.Option(help="Starting weights: .safetensors, or a .pt/.pth state_dict (loaded weights-only).")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (with --data).")] = 10,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate (cosine schedule).")] = 1e-3,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size per process.")] = 128,
    steps_per_epoch: Annotated[int | None, typer.Option(min=1, help="Cap on batches per epoch (quick runs).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    workers: Annotated[int, typer.Option(min=0, help="Data-loading worker processes.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted training run.")] = False,
    sync_bn: Annotated[bool, typer.Option(help="Under torchrun on GPUs: synchronise BatchNorm statistics across processes.")] = False,
    amp: Annotated[bool, typer.Option(help="Automatic mixed precision (bfloat16 autocast), for GPUs.")] = False,
    channels_last: Annotated[bool, typer.Option(help="Channels-last memory format, for GPUs.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a run directory that belongs to another model, or holds trained, pruned or exported work.")] = False,
    teacher: Annotated[Path | None, typer.Option(help="Distil from the float model with these weights (.safetensors or a .pt/.pth state_dict).")] = None,
    teacher_epochs: Annotated[int, typer.Option(min=0, help="Train the float model this many epochs first, distil from it and start from its weights.")] = 0,
    real_weight_epochs: Annotated[int, typer.Option(min=0, help="Two-step training: first train this many epochs with binary activations and real weights, then --epochs with both binary (ReActNet).")] = 0,
    distill: Annotated[float, typer.Option(min=0.0, help="With a teacher: weight of the distillation term (CE + w T^2 KL).")] = 1.0,
    temperature: Annotated[float, typer.Option(min=0.01, help="With a teacher: distillation temperature T.")] = 4.0,
) -> None:
    """Binarize MODEL's convs (first and last stay real) and, with --data, train the binary network."""
    from bnnslim.checks import refuse_replacing_work
    from bnnslim.distributed import init_from_env
    from bnnslim.stages.binarize import BinarizeOptions, binarize, parse_input_shape
    from bnnslim.train import TrainConfig

    refuse_replacing_work(run, overwrite, resume)
    device = init_from_env(device)
    train = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, steps_per_epoch=steps_per_epoch,
                        workers=workers, amp=amp, channels_last=channels_last, distill=distill,
                        temperature=temperature) if data else None
    opts = BinarizeOptions(
        model=model, run=run, data=data, data_root=data_root, scheme=scheme, real=real or (),
        binary=binary or (), keep_first_last_real=not binarize_first_last,
        input_shape=parse_input_shape(input_shape) if input_shape else None, weights=weights,
        train=train, resume=resume, overwrite=overwrite, device=device, sync_bn=sync_bn,
        teacher=teacher, teacher_epochs=teacher_epochs, real_weight_epochs=real_weight_epochs if data else 0,
    )
    with Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1%}"),
                  TimeElapsedColumn(), console=console, transient=True,
                  disable=train is None or console.quiet) as progress:
        task = progress.add_task("train", total=None, epoch=0, loss=0.0, acc=0.0)

        def on_step(ev):
            progress.update(task, completed=ev.step, total=ev.steps, epoch=ev.epoch + 1, loss=ev.loss, acc=ev.accuracy)

        def on_epoch(rec):
            progress.console.print(f"epoch {rec.epoch}: train loss {rec.train_loss:.3f} acc {rec.train_accuracy:.1%}"
                                   f" | test loss {rec.test_loss:.3f} acc {rec.test_accuracy:.1%}")

        result = binarize(opts, on_step=on_step, on_epoch=on_epoch, on_phase=progress.console.print)

    table = Table(title=f"binarized {model}", show_lines=False)
    table.add_column("layer")
    table.add_column("kept as")
    for name in result.plan.binary:
        table.add_row(name, "binary")
    for name, why in result.plan.real.items():
        table.add_row(name, f"real ({why})")
    console.print(table)
    if result.test_accuracy is not None:
        console.print(f"binary test accuracy: [bold]{result.test_accuracy:.2%}[/] after {len(result.history)} epochs")
    console.print(f"run directory: {result.run.path} ({result.seconds:.1f} s)")
