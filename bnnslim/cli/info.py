"""``bnnslim info [PATH]``: what is in a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from bnnslim.cli._common import DEFAULT_RUN, ModelOption, TrustSourceOption, console, friendly_errors
from bnnslim.errors import BnnslimError

if TYPE_CHECKING:
    from bnnslim.run_model import RunModel


@friendly_errors
def info_command(
    path: Annotated[Path | None, typer.Argument(help="Run directory (default: --run).")] = None,
    run: Annotated[Path, typer.Option("--run", help="Run directory shared by bnnslim's commands.")] = DEFAULT_RUN,
    model: ModelOption = None,
    trust_source: TrustSourceOption = False,
    datasets: Annotated[bool, typer.Option(
        "--datasets", help="List the datasets --data accepts, with their input shapes.")] = False,
) -> None:
    """Show a run directory (model, scheme, dataset, metrics, every layer) or a model file from `bnnslim export`."""
    if datasets:
        _datasets_info()
        return
    if path is not None and path.is_file():
        _file_info(path)
        return
    from bnnslim.report import layer_costs
    from bnnslim.run_model import load_run_model
    from bnnslim.rundir import RunDir

    loaded = load_run_model(RunDir(path or run), model=model, trust_source=trust_source)
    m = loaded.manifest
    head = Table(show_header=False, title=f"run {path or run}")
    head.add_row("model", f"{m['model']['source']}:{m['model']['name']}")
    head.add_row("sha256", m["model"]["sha256"][:16] + "...")
    head.add_row("input shape", "x".join(str(d) for d in m["input_shape"]))
    head.add_row("scheme", m["scheme"])
    head.add_row("dataset", m["dataset"]["name"] if m.get("dataset") else "-")
    acc = m.get("binarize", {}).get("test_accuracy")
    head.add_row("binary test accuracy", f"{acc:.2%}" if acc is not None else "not trained")
    for stage, text in _training_rows(m).items():
        head.add_row(stage, text)
    head.add_row("bnnslim version", m.get("bnnslim_version", "?"))
    console.print(head)
    table = Table(title="layers (counted as the export report counts them)")
    for col in ("layer", "type", "in", "out (filters)", "weights", "MACs", "binary ops"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for row in layer_costs(loaded.model, loaded.example()).values():
        style = "bold" if row.kind == "binary conv" else None
        table.add_row(row.name, row.kind, str(row.in_channels), str(row.filters), f"{row.params:,}", f"{row.macs:,}",
                      f"{row.binary_ops:,}", style=style)
    console.print(table)
    _unprunable(loaded)


def _training_rows(manifest: dict) -> dict[str, str]:
    """How each stage trained: its teacher and loss, and what pruning kept (a damaged entry shows as '?')."""
    def section(value: object) -> dict:
        return value if isinstance(value, dict) else {}

    def percent(value: object) -> str:
        return f"{value:.2%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"

    def named(t: dict) -> str:
        return f"{t.get('network', '?')}" + (f" ({t['weights']})" if isinstance(t.get("weights"), str) else "")

    rows: dict[str, str] = {}
    binarize, teacher = section(manifest.get("binarize")), section(manifest.get("teacher"))
    if binarize.get("trained"):
        rows["binarize loss"] = f"{binarize.get('loss', 'cross-entropy')}" + (
            f"; teacher: {named(teacher)}" if teacher else "")
    two_step = section(manifest.get("two_step"))
    if two_step:
        first = section((binarize.get("real_weight_history") or [{}])[-1])
        rows["binarize steps"] = (f"two-step: {two_step.get('real_weight_epochs', '?')} epochs with real weights and "
                                  f"binary activations (test accuracy {percent(first.get('test_accuracy'))}), then "
                                  f"{two_step.get('then', '?')}")
    prune = manifest.get("prune")
    if isinstance(prune, dict):
        t = section(prune.get("teacher"))
        rows["prune"] = (f"--keep {prune.get('keep')} --strategy {prune.get('strategy')}: {prune.get('filters_kept')} "
                         f"of {prune.get('filters_total')} filters, test accuracy "
                         f"{percent(prune.get('accuracy_before'))} before, {percent(prune.get('accuracy_after'))} after")
        rows["prune loss"] = f"{prune.get('loss', '?')}; teacher: {named(t) if t else 'none'}"
        # runs pruned before --retrain-scope existed retrained upward
        scope = "every layer" if prune.get("retrain_scope") == "all" else "the group and the layers after it"
        rows["prune retraining"] = f"{prune.get('retrain_steps', '?')} steps per group, {scope}"
        rows["prune fine-tuning"] = f"{prune.get('finetune_steps', '?')} steps, masks fixed"
    return rows


def _unprunable(loaded: RunModel) -> None:
    """The binary convs whose filters `bnnslim prune` keeps whole, and why (from the same scan prune makes)."""
    from bnnslim.summary import unprunable_convs

    exclude = tuple(((loaded.manifest.get("prune") or {}).get("options") or {}).get("exclude", ()))
    try:
        skipped = unprunable_convs(loaded.model, loaded.example(), exclude)
    except BnnslimError as exc:
        console.print(f"[yellow]note[/]: prunable groups unknown: {escape(exc.one_line())}", highlight=False)
        return
    if not skipped:
        console.print("every binary conv's filters can be pruned")
        return
    table = Table(title="not prunable (kept whole by bnnslim prune)")
    table.add_column("conv")
    table.add_column("why", overflow="fold")
    for name, why in skipped.items():
        table.add_row(name, why)
    console.print(table)


def _file_info(path: Path) -> None:
    import json

    from safetensors import safe_open

    from bnnslim.model_file import read_header

    meta = read_header(path)
    model = json.loads(meta["model"])
    metrics = json.loads(meta.get("metrics", "{}"))
    head = Table(show_header=False, title=f"bnnslim model file {path}")
    head.add_row("form", meta["form"] + (" (1-bit binary weights)" if meta["form"] == "packed" else ""))
    head.add_row("size on disk", f"{path.stat().st_size:,} bytes")
    head.add_row("model", f"{model['source']}:{model['name']}")
    head.add_row("sha256", model["sha256"][:16] + "...")
    head.add_row("scheme", meta["scheme"])
    head.add_row("input shape", "x".join(str(d) for d in json.loads(meta["input_shape"])))
    for key, value in metrics.items():
        head.add_row(key, f"{value:.2%}" if key == "accuracy" and value is not None else str(value))
    head.add_row("bnnslim version", meta["bnnslim_version"])
    console.print(head)
    binary = set(json.loads(meta["binary_layers"]))
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    table = Table(title="layers")
    for col in ("layer", "type", "in", "out (filters)", "stored as"):
        table.add_column(col)
    for name, shape in json.loads(meta["layers"]).items():
        kind = "binary conv" if name in binary else ("batchnorm" if "features" in shape else
                                                     "conv" if "groups" in shape else "linear")
        stored = ", ".join(f"{k.rsplit('.', 1)[1]} {list(v)}" for k, v in shapes.items()
                           if k.rsplit(".", 1)[0] == name and not k.endswith(("running_mean", "running_var",
                                                                              "num_batches_tracked")))
        table.add_row(name, kind, str(shape.get("in", shape.get("features"))),
                      str(shape.get("out", shape.get("features"))), stored)
    console.print(table)


def _datasets_info() -> None:
    from bnnslim.plugins import datasets

    table = Table(title="datasets (--data NAME)")
    for col in ("name", "input", "classes", "from"):
        table.add_column(col, no_wrap=True)
    table.add_column("description", overflow="fold")
    for name, provided in sorted(datasets().items()):
        spec = provided.spec
        table.add_row(name, "x".join(str(d) for d in spec.input_shape), str(spec.num_classes or "from the data"),
                      provided.provider, spec.description + (" (needs --data-root)" if spec.needs_root else ""))
    console.print(table)
