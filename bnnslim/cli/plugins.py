"""``bnnslim plugins``: what each plugin provides; and the commands plugins add to ``bnnslim``."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from bnnslim.cli._common import console, err_console, friendly_errors
from bnnslim.errors import BnnslimError

if TYPE_CHECKING:
    from bnnslim.plugins import PluginReport, Provided

HOOK_PREFIX = "bnnslim_"


def plugins_report(reports: list[PluginReport]) -> dict[str, Any]:
    """The ``--json`` document: one entry per plugin, hooks by their full names."""
    return {"plugins": [
        {"name": r.info.name, "distribution": r.info.distribution or None, "version": r.info.version or None,
         "builtin": r.info.builtin, "provides": r.provides, "errors": r.errors}
        for r in reports
    ]}


@friendly_errors
def plugins_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the plugins (built-in and installed), their distributions, and what each provides."""
    from bnnslim.plugins import describe_plugins, external_plugins_disabled

    reports = describe_plugins()
    if as_json:
        typer.echo(json.dumps(plugins_report(reports), indent=2))
    else:
        title = "bnnslim plugins" + (" (external plugins disabled)" if external_plugins_disabled() else "")
        table = Table(title=title)
        for col in ("plugin", "distribution", "version"):
            table.add_column(col, no_wrap=True)
        table.add_column("provides", overflow="fold")
        for r in reports:
            lines = [f"{hook.removeprefix(HOOK_PREFIX)}: {escape(', '.join(names))}"
                     for hook, names in r.provides.items()]
            lines += [f"[red]{hook.removeprefix(HOOK_PREFIX)}: {escape(msg)}[/]" for hook, msg in r.errors.items()]
            name = r.info.name.removeprefix("bnnslim.default_plugins.") if r.info.builtin else r.info.name
            table.add_row(name, r.info.distribution or "-", r.info.version or "-", "\n".join(lines) or "-")
        console.print(table)
    failed = [(r, hook, msg) for r in reports for hook, msg in r.errors.items()]
    if failed:
        _report, hook, msg = failed[0]
        raise BnnslimError(f"{len(failed)} plugin problem(s) (the other plugins work); first, {hook}: {msg}",
                           "see the table; fix or uninstall the plugins named there")


def add_plugin_commands(app: typer.Typer, argv: Sequence[str] | None = None) -> list[str]:
    """Add every plugin's commands (``bnnslim_commands`` hook) to ``app``; returns their names.

    A plugin that cannot be loaded does not stop ``bnnslim`` nor the other
    plugins: their commands are added, and unless ``argv`` names one of
    bnnslim's own commands (which ``bnnslim plugins`` reports on) each problem is
    a one-line warning. A plugin command cannot replace one of bnnslim's own,
    and a command name two plugins offer is left out.
    """
    from bnnslim.plugins import commands, problems

    taken = {info.name or getattr(info.callback, "__name__", "") for info in app.registered_commands}
    command = next((a for a in argv or () if not a.startswith("-")), None)
    try:
        provided = commands()
        found = problems()
    except BnnslimError as exc:  # a built-in plugin is broken: bnnslim's own commands still run
        provided, found = {}, []
        if command not in taken:
            err_console.print(f"[yellow]warning:[/] plugin commands not loaded: {escape(exc.one_line())}",
                              highlight=False, soft_wrap=True)
    if command not in taken:  # --help, or maybe a plugin's command: say why some plugin commands may be missing
        for problem in found:
            err_console.print(f"[yellow]warning:[/] a plugin is not loaded, its commands are missing: "
                              f"{escape(problem.message)}", highlight=False, soft_wrap=True)
    added = []
    for name, p in provided.items():
        if name in taken:
            err_console.print(f"[yellow]warning:[/] {escape(p.provider)} offers a command '{name}', "
                              f"which is bnnslim's own; ignored", highlight=False, soft_wrap=True)
            continue
        if p.conflict:
            err_console.print(f"[yellow]warning:[/] command '{name}' is offered {escape(p.conflict)}; ignored "
                              "until one of them is uninstalled", highlight=False, soft_wrap=True)
            continue
        app.command(name, help=p.spec.help)(guard_command(p))
        added.append(name)
    return added


def guard_command(provided: Provided) -> Any:
    """The plugin's callback, with any unexpected exception turned into an error naming the plugin."""
    callback = provided.spec.callback
    name = provided.spec.name

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except (BnnslimError, typer.Exit, typer.Abort, typer.TyperException, BrokenPipeError):
            raise  # BrokenPipeError: the output pipe closed (`| head`), not the plugin's fault
        except Exception as exc:
            raise BnnslimError(f"command '{name}' from {provided.provider} failed: {type(exc).__name__}: {exc}",
                               provided.info.fix) from exc

    return friendly_errors(run)
