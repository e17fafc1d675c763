"""``bnnslim info [PATH]``: what is in a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from bnnslim.cli._common import DEFAULT_RUN, console, friendly_errors


@friendly_errors
def info_command(
    path: Annotated[Optional[Path], typer.Argument(help="Run directory (default: --run).")] = None,
    run: Annotated[Path, typer.Option("--run", help="Run directory shared by bnnslim's commands.")] = DEFAULT_RUN,
) -> None:
    """Show a run directory: model, scheme, dataset, metrics, and every layer."""
    from bnnslim.run_model import load_run_model
    from bnnslim.rundir import RunDir
    from bnnslim.summary import layer_rows

    loaded = load_run_model(RunDir(path or run))
    m = loaded.manifest
    head = Table(show_header=False, title=f"run {path or run}")
    head.add_row("model", f"{m['model']['source']}:{m['model']['name']}")
    head.add_row("sha256", m["model"]["sha256"][:16] + "...")
    head.add_row("input shape", "x".join(str(d) for d in m["input_shape"]))
    head.add_row("scheme", m["scheme"])
    head.add_row("dataset", m["dataset"]["name"] if m.get("dataset") else "-")
    acc = m.get("binarize", {}).get("test_accuracy")
    head.add_row("binary test accuracy", f"{acc:.2%}" if acc is not None else "not trained")
    head.add_row("bnnslim version", m.get("bnnslim_version", "?"))
    console.print(head)
    table = Table(title="layers")
    for col in ("layer", "type", "in", "out (filters)", "parameters"):
        table.add_column(col, justify="right" if col in ("in", "out (filters)", "parameters") else "left")
    for row in layer_rows(loaded.model):
        style = "bold" if row.kind == "binary conv" else None
        table.add_row(row.name, row.kind, str(row.in_channels), str(row.out_channels), f"{row.params:,}", style=style)
    console.print(table)
