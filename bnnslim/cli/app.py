"""The ``bnnslim`` Typer application."""

from __future__ import annotations

import sys

import typer

from bnnslim._version import __version__
from bnnslim.cli import bench, binarize, export, info, prune, trust
from bnnslim.cli import plugins as plugins_cli

app = typer.Typer(
    name="bnnslim",
    help="Make binary neural networks small: binarize a PyTorch model, learn which filters to keep, slim and export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("binarize")(binarize.binarize_command)
app.command("prune")(prune.prune_command)
app.command("export")(export.export_command)
app.command("info")(info.info_command)
app.command("bench")(bench.bench_command)
app.command("plugins")(plugins_cli.plugins_command)
app.command("trust")(trust.trust_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnnslim {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Make binary neural networks small."""


def main() -> None:
    plugins_cli.add_plugin_commands(app, sys.argv[1:])  # plugin commands (bnnslim_commands hook) join at startup
    app()
