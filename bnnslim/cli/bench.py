"""``bnnslim bench PATH``: latency of the packed runtime vs torch's float and binary models."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from bnnslim.cli._common import console, err_console, friendly_errors

if TYPE_CHECKING:
    from bnnslim.bench import BenchPoint


#: column titles: the float original, torch's binary emulation, bnnslim's packed runtime
COLUMNS = {"float": "float", "torch_binary": "torch binary", "packed": "packed"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.3f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


@friendly_errors
def bench_command(
    path: Annotated[Path, typer.Argument(
        help="A model file from `bnnslim export` (plain or packed), or a run directory (its exported model).")],
    batch: Annotated[list[int] | None, typer.Option(
        "--batch", "-b", help="Batch size; repeatable. Default: 1.")] = None,
    threads: Annotated[list[int] | None, typer.Option(
        "--threads", "-t", help="CPU threads; repeatable. Default: 1.")] = None,
    repeats: Annotated[int, typer.Option(
        help="Timed calls of each model per batch size and thread count (the median is reported).")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed calls of each model first.")] = 5,
    model_file: Annotated[str | None, typer.Option(
        "--model", "--model-file",
        help="The model code you trust: FILE[:NAME] (its sha256 must match the export) or PREFIX:NAME; "
             "needed for a file this account's bnnslim did not export.")] = None,
    trust_source: Annotated[bool, typer.Option(
        "--trust-source",
        help="Import the model file the header records (only if you trust where the file came from).")] = False,
    layers: Annotated[bool, typer.Option(
        help="Time every conv and linear layer too (a second pass with hooks).")] = True,
    plan: Annotated[bool, typer.Option(
        help="First time each binary conv packed and in float on its input shape; "
             "unfused layers where float wins run float.")] = True,
    compare: Annotated[bool, typer.Option(
        "--compare",
        help="Also time ONNX Runtime (fp32, int8) on the float original and Larq Compute Engine on the binary model "
             "(pip install bnnslim[compare]; LCE from $BNNSLIM_LCE_PYTHON).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Time the float original, torch's binary emulation and bnnslim's packed XNOR-popcount runtime on this CPU."""
    if threads and max(threads) > 1 and "torch" not in sys.modules:
        # OpenMP reads this once, when torch loads: waiting threads sleep instead of spinning, which on a
        # loaded machine keeps them from stealing the cores the working threads need
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from bnnslim.bench import MODELS, bench

    if as_json:
        result = bench(path, batch or [1], threads or [1], repeats, warmup, model_file, layers,
                       trust_source=trust_source, plan_layers=plan, compare=compare)
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    with console.status("timing...") as status:
        result = bench(path, batch or [1], threads or [1], repeats, warmup, model_file, layers,
                       progress=lambda what: status.update(f"timing {what}..."), trust_source=trust_source,
                       plan_layers=plan, compare=compare)
    head = Table(show_header=False, title=f"bnnslim bench {result.file}")
    head.add_row("model", f"{result.model} ({result.form} file, input {'x'.join(map(str, result.input_shape))})")
    head.add_row("CPU", f"{result.cpu}, {result.cores} cores available")
    head.add_row("packed kernel", result.kernel + ("" if result.fast_popcount else " (no vector popcount)"))
    conv_plan = result.plan
    head.add_row("binary convs", f"{len(conv_plan['kernel'])} on the kernels, {len(conv_plan['emulated'])} emulated, "
                                 f"{len(conv_plan['unchanged'])} not packed")
    head.add_row("packed vs torch binary",
                 f"max |difference| {result.max_abs_difference:.2g}; equals its own emulation: "
                 f"{'yes' if result.matches_emulation else 'NO'}")
    console.print(head)
    table = Table(title=f"latency, median of {result.repeats} calls after {result.warmup} warm-up (ms)")
    for col in ("batch", "threads", *(COLUMNS[m] for m in MODELS), "packed vs float", "packed vs torch binary"):
        table.add_column(col, justify="right")
    for p in result.points:
        table.add_row(str(p.batch), str(p.threads), *(_ms(p.latency_ms[m]) for m in MODELS),
                      f"[bold]{_x(p.speedup['packed_vs_float'])}[/]", _x(p.speedup["packed_vs_torch_binary"]))
    console.print(table)
    console.print("float: the original model, unpruned and real-valued (fresh weights); torch binary: the slim "
                  "binary model in torch (`bnnslim.load(path)`); packed: the same on bnnslim's XNOR-popcount runtime "
                  "(`bnnslim.load(path, runtime=\"packed\")`)", style="dim", highlight=False)
    if result.layer_plan:
        console.print(_plan_table(result.layer_plan, result.plan))
    if result.compare is not None:
        console.print(_compare_table(result.compare))
    for p in result.points:
        if p.layers:
            console.print(_layer_table(p))
    for note in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)


def _plan_table(choices: list[dict[str, Any]], plan: dict[str, Any]) -> Table:
    fused, folded, packed = plan.get("fused", {}), plan.get("folded", {}), plan.get("packed_inputs", {})
    table = Table(title="plan: each binary conv timed packed and as a float conv on its input (median ms)")
    for col in ("layer", "input", "packed", "float", "runs", "why"):
        table.add_column(col, justify="right" if col in ("packed", "float") else "left")
    for c in choices:
        why = c["why"] + (f"; bits to '{fused[c['layer']]}'" if c["layer"] in fused else "")
        if c["layer"] in folded:
            why += "; folded in: " + ", ".join(folded[c["layer"]])
        if c["layer"] in packed:
            why += "; reads bits packed once, skipping: " + ", ".join(packed[c["layer"]])
        table.add_row(c["layer"], "x".join(map(str, c["shape"])), _ms(c["packed_ms"]), _ms(c["float_ms"]),
                      c["runs"], escape(why), style=None if c["runs"] == "packed" else "yellow")
    return table


def _compare_table(compare: dict[str, Any]) -> Table:
    from bnnslim.bench import ENGINES

    table = Table(title=f"other engines, batch {compare['batch']}, 1 thread (median ms; > 1x: packed is faster)")
    for col in ("engine", "ms", "packed is"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    table.add_row("bnnslim packed runtime", _ms(compare["latency_ms"]["packed"]), "", style="bold")
    for name, ratio in compare["packed_speedup"].items():
        table.add_row(ENGINES.get(name, name), _ms(compare["latency_ms"][name]), _x(ratio))
    for engine, why in compare["missing"].items():
        table.add_row(f"{engine}: not timed", "-", escape(why[:80]), style="dim")
    return table


def _layer_table(point: BenchPoint) -> Table:
    from bnnslim.bench import MODELS

    table = Table(title=f"per layer, batch {point.batch}, {point.threads} thread{'s' if point.threads > 1 else ''} "
                        "(median ms per call)")
    table.add_column("layer")
    table.add_column("kind")
    for m in MODELS:
        table.add_column(COLUMNS[m], justify="right")
    table.add_column("packed vs float", justify="right")
    for row in point.layers:
        style = "bold" if row.kind == "binary conv" else ("dim" if row.kind == "other" else None)
        name = "other (BN, pool, act.)" if row.kind == "other" else row.layer
        table.add_row(name, "" if row.kind == "other" else row.kind, *(_ms(row.ms[m]) for m in MODELS),
                      _x(row.speedup), style=style)
    return table
