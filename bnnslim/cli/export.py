"""``bnnslim export``: slim the pruned model and write deployable files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from bnnslim.cli._common import (
    DEFAULT_RUN,
    ModelOption,
    RunOption,
    TrustSourceOption,
    console,
    err_console,
    friendly_errors,
)


def _size(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:,.2f} MiB"


@friendly_errors
def export_command(
    run: RunOption = DEFAULT_RUN,
    format: Annotated[list[str] | None, typer.Option(
        "--format", "-f", help="plain, packed (1-bit) or onnx; repeatable. Default: plain and packed.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output file (with one --format).")] = None,
    evaluate: Annotated[bool, typer.Option(help="Measure the slim model's test accuracy on the run's dataset.")] = True,
    model: ModelOption = None,
    trust_source: TrustSourceOption = False,
) -> None:
    """Remove the pruned filters for real, check the slim model equals the masked one, and save it."""
    from bnnslim.stages.export import export

    result = export(run, tuple(format or ("plain", "packed")), output, evaluate_data=evaluate, model=model,
                    trust_source=trust_source)
    for note in result.notes:
        console.print(f"[yellow]note[/]: {note}")
    table = Table(title="slimmed model")
    for col in ("layer", "kind", "filters", "params", "MACs", "binary ops"):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for r in result.rows:
        shared = f" (runs {r['calls_before']}x)" if r.get("calls_before", 1) > 1 else ""
        table.add_row(r["layer"] + shared, r["kind"], f"{r['filters_before']} -> {r['filters_after']}",
                      f"{r['params_before']:,} -> {r['params_after']:,}",
                      f"{r['macs_before']:,} -> {r['macs_after']:,}",
                      f"{r['binary_ops_before']:,} -> {r['binary_ops_after']:,}")
    console.print(table)
    sizes = Table(title="files")
    sizes.add_column("form")
    sizes.add_column("size", justify="right")
    sizes.add_column("vs fp32", justify="right")
    sizes.add_column("path")
    base = result.sizes["fp32 original"]
    sizes.add_row("fp32 original (unpruned)", _size(base), "1x", "")
    for form, path in result.files.items():
        sizes.add_row(form, _size(result.sizes[form]), f"1/{base / result.sizes[form]:.1f}", str(path))
    console.print(sizes)
    if result.pruned:
        console.print(f"slim == masked on a probe batch (max difference {result.max_difference:.2g})")
    if result.accuracy is not None:
        console.print(f"slim model test accuracy: [bold]{result.accuracy:.2%}[/]")
    if result.report_path is not None:
        console.print(f"report: {result.report_path}, chart: {result.chart_path}")
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
