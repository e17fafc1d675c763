"""Plugins on the command line: ``bnnslim plugins``, plugin commands, strategy plugins that fail inside
``bnnslim prune``, and what ``bnnslim --help`` imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import typer
from _helpers import QUICK, TINY_MODEL, assert_clean_error, snapshot
from typer.testing import CliRunner, Result

import bnnslim
from bnnslim import plugins
from bnnslim.cli.plugins import add_plugin_commands
from bnnslim.errors import BnnslimError
from bnnslim.hookspecs import hookimpl
from bnnslim.plugin_types import CommandSpec, SchemeSpec, Selection, SelectionContext, StrategySpec
from bnnslim.stages.prune import PruneOptions, prune


@pytest.fixture
def register() -> Iterator[Callable[..., object]]:
    pm = plugins.get_plugin_manager()
    added: list[object] = []

    def reg(plugin: object, name: str, distribution: str = "", version: str = "") -> object:
        pm.register(plugin, name=name)
        if distribution:
            plugins._INFO[name] = plugins.PluginInfo(name, distribution, version)
        added.append(plugin)
        return plugin

    yield reg
    for plugin in added:
        pm.unregister(plugin)
    plugins.reset_plugin_manager()


def strategy_plugin(name: str, select: Callable[[SelectionContext], object]) -> object:
    class StrategyPlugin:
        @hookimpl
        def bnnslim_strategies(self):  # type: ignore[no-untyped-def]
            yield StrategySpec(name, "a test strategy", select)  # type: ignore[arg-type]

    return StrategyPlugin()


# -- bnnslim plugins -------------------------------------------------------------------------------------------


def test_plugins_table_lists_builtins_with_what_they_provide(cli: Callable[..., Result]) -> None:
    result = cli("plugins")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "external plugins disabled" in out
    for words in ("datasets", "fashion-mnist-mini", "strategies: subsidiary, l1", "model_sources: torchvision",
                  "schemes: xnor, sign, bireal", "bnnslim", "0.1.0"):
        assert words in out


def test_plugins_json_includes_a_registered_plugin(cli: Callable[..., Result], register: Callable[..., object]) -> None:
    register(strategy_plugin("mine", lambda ctx: None), "mine-plugin", "bnnslim-mine", "0.4")
    result = cli("plugins", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    by_name = {p["name"]: p for p in doc["plugins"]}
    assert by_name["mine-plugin"] == {"name": "mine-plugin", "distribution": "bnnslim-mine", "version": "0.4",
                                      "builtin": False, "provides": {"bnnslim_strategies": ["mine"]}, "errors": {}}
    builtin = by_name["bnnslim.default_plugins.strategies"]
    assert builtin["builtin"] and builtin["distribution"] == "bnnslim"
    assert builtin["provides"]["bnnslim_strategies"][:2] == ["subsidiary", "l1"]


def test_plugins_command_shows_a_failing_hook_and_exits_1(cli: Callable[..., Result],
                                                          register: Callable[..., object]) -> None:
    class Failing:
        @hookimpl
        def bnnslim_datasets(self):  # type: ignore[no-untyped-def]
            raise OSError("disk on fire")

    register(Failing(), "failing", "bnnslim-failing", "1.2")
    result = cli("plugins")
    assert "disk on fire" in result.stdout  # in the table, next to the other plugins
    assert "fashion-mnist-mini" in result.stdout
    assert_clean_error(result, "1 plugin problem(s) (the other plugins work)",
                       "plugin 'failing' (bnnslim-failing 1.2) raised in bnnslim_datasets: OSError: disk on fire")


# -- plugin commands -----------------------------------------------------------------------------------------


@pytest.fixture
def app_with_plugins(monkeypatch: pytest.MonkeyPatch) -> Callable[..., typer.Typer]:
    """The bnnslim app with plugin commands added to a copy of its command list (restored afterwards)."""
    from bnnslim.cli.app import app

    def make(argv: list[str] | None = None) -> typer.Typer:
        monkeypatch.setattr(app, "registered_commands", list(app.registered_commands))
        add_plugin_commands(app, argv)
        return app

    return make


def command_plugin(name: str, callback: Callable[..., None]) -> object:
    class CommandPlugin:
        @hookimpl
        def bnnslim_commands(self):  # type: ignore[no-untyped-def]
            yield CommandSpec(name, f"the {name} command", callback)

    return CommandPlugin()


def test_plugin_command_is_added_with_its_options(app_with_plugins: Callable[..., typer.Typer],
                                                  register: Callable[..., object]) -> None:
    def hello(name: str = typer.Option("world", help="Who to greet.")) -> None:
        typer.echo(f"hello {name}")

    register(command_plugin("hello", hello), "hello-plugin")
    app = app_with_plugins()
    runner = CliRunner()
    assert runner.invoke(app, ["hello", "--name", "plugins"]).stdout == "hello plugins\n"
    assert "the hello command" in runner.invoke(app, ["--help"]).stdout


def test_plugin_command_that_crashes_names_the_plugin(app_with_plugins: Callable[..., typer.Typer],
                                                     register: Callable[..., object]) -> None:
    def explode() -> None:
        raise ZeroDivisionError("boom")

    register(command_plugin("explode", explode), "exploder", "bnnslim-exploder", "0.0.1")
    result = CliRunner().invoke(app_with_plugins(), ["explode"])
    assert_clean_error(result, "command 'explode' from plugin 'exploder' (bnnslim-exploder 0.0.1) failed: "
                       "ZeroDivisionError: boom", "fix or uninstall bnnslim-exploder")


def test_plugin_command_cannot_replace_a_builtin(app_with_plugins: Callable[..., typer.Typer],
                                                 register: Callable[..., object],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    register(command_plugin("prune", lambda: None), "hijack")
    app = app_with_plugins()
    assert "offers a command 'prune', which is bnnslim's own; ignored" in capsys.readouterr().err
    prunes = [c for c in app.registered_commands if c.name == "prune"]
    assert len(prunes) == 1 and prunes[0].callback.__name__ == "prune_command"


def test_broken_plugin_does_not_stop_the_command_line(monkeypatch: pytest.MonkeyPatch,
                                                       app_with_plugins: Callable[..., typer.Typer],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    ep = importlib.metadata.EntryPoint(name="gone", value="no_such_module_abc", group="bnnslim")
    monkeypatch.delenv(plugins.DISABLE_EXTERNAL_ENV)
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda group=None: [ep])
    plugins.reset_plugin_manager()
    try:
        app = app_with_plugins(["--help"])  # help works, and says why plugin commands are missing
        warning = capsys.readouterr().err
        assert "a plugin is not loaded, its commands are missing" in warning and "plugin 'gone'" in warning
        app = app_with_plugins(["plugins", "--json"])  # bnnslim's own command: its error says it, once
        assert capsys.readouterr().err == ""
        result = CliRunner().invoke(app, ["plugins", "--json"])
        assert_clean_error(result, "plugin 'gone' from distribution '?' failed to import", "no_such_module_abc")
        doc = json.loads(result.stdout)  # the JSON is still printed, the broken plugin listed in it
        assert {"name": "gone", "errors": doc["plugins"][-1]["errors"]} == {
            "name": doc["plugins"][-1]["name"], "errors": {"load": doc["plugins"][-1]["errors"]["load"]}}
        assert "fashion-mnist-mini" in json.dumps(doc)
    finally:
        plugins.reset_plugin_manager()


# -- strategies that misbehave inside bnnslim prune ------------------------------------------------------------


def _size_plus_one(ctx: SelectionContext) -> Selection:
    return Selection(scores=torch.ones(ctx.group.size + 1))


def _nan(ctx: SelectionContext) -> Selection:
    return Selection(scores=torch.full((ctx.group.size,), float("nan")))


def _raises(ctx: SelectionContext) -> Selection:
    raise RuntimeError("exploded while selecting")


def _keep_too_many(ctx: SelectionContext) -> Selection:
    return Selection(scores=torch.ones(ctx.group.size), keep=ctx.group.size + 5)


@pytest.mark.parametrize("select, words", [
    (_raises, "on group 1.0 failed: RuntimeError: exploded while selecting"),
    (_size_plus_one, "on group 1.0 returned 9 scores for 8 channels"),
    (_nan, "returned non-finite scores"),
    (_keep_too_many, "proposed keeping 13 of 8 channels"),
    (lambda ctx: [1.0] * ctx.group.size, "returned list, not a Selection"),
])
def test_bad_strategy_plugin_is_named_and_the_run_stays_intact(
        tiny_run: Path, tmp_path: Path, cli: Callable[..., Result], register: Callable[..., object],
        select: Callable[[SelectionContext], object], words: str) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    register(strategy_plugin("bad", select), "bad-plugin", "bnnslim-bad", "0.9")
    before = snapshot(run)
    result = cli("prune", "--run", run, "--keep", "0.5", "--strategy", "bad", *QUICK)
    assert_clean_error(result, "strategy 'bad' from plugin 'bad-plugin' (bnnslim-bad 0.9)", words,
                       "fix or uninstall bnnslim-bad, or choose another --strategy")
    assert snapshot(run) == before


def test_a_strategy_cannot_empty_a_layer(tiny_run: Path, tmp_path: Path, register: Callable[..., object]) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    register(strategy_plugin("nothing", lambda ctx: Selection(scores=torch.zeros(ctx.group.size), keep=0)),
             "greedy-remover")
    result = prune(run, PruneOptions(keep=0.5, strategy="nothing", select_steps=1, retrain_steps=1, batch_size=32))
    assert result.records and all(r.proposed == 0 and r.kept >= 1 for r in result.records)
    assert all(after >= 1 for _before, after in result.layer_counts.values())


# -- what bnnslim --help imports --------------------------------------------------------------------------------

HELP_SCRIPT = """
import json, sys
from bnnslim.cli.app import main
sys.argv = ["bnnslim", "--help"]
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""
PLUGIN_CODE = ("torchvision", "torch_pruning", "PIL", "safetensors", "bnnslim.prune", "bnnslim.graph",
               "bnnslim.model_source", "bnnslim.train", "bnnslim_fpgm.rule", "bnnslim_synthetic_shapes.dataset",
               "bnnslim_synthetic_shapes.generate")


def _help_modules() -> tuple[set[str], str]:
    env = {k: v for k, v in os.environ.items() if k != plugins.DISABLE_EXTERNAL_ENV}  # installed plugins load too
    proc = subprocess.run([sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    *help_lines, modules = proc.stdout.strip().splitlines()
    return set(json.loads(modules)), "\n".join(help_lines)


def test_help_loads_plugins_but_no_heavy_plugin_code() -> None:
    modules, help_text = _help_modules()
    assert "bnnslim.plugins" in modules and "plugins" in help_text  # plugin commands were looked for
    imported = sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in PLUGIN_CODE))
    assert imported == []


def test_help_imports_neither_torch_nor_datasets() -> None:
    modules, _ = _help_modules()
    assert sorted(m for m in modules if m == "torch" or m.startswith(("torch.", "bnnslim.data"))) == []


# -- runs record the plugins they used ------------------------------------------------------------------------


def test_a_run_records_its_plugins_and_names_the_missing_one(tmp_path: Path, register: Callable[..., object],
                                                              cli: Callable[..., Result]) -> None:
    """A run made with a plugin's scheme and strategy records the distribution and version of each; once the
    scheme's plugin is uninstalled, loading the run or its export says what to install instead of 'unknown'."""
    from bnnslim.default_plugins.schemes import bnnslim_schemes

    xnor = next(s for s in bnnslim_schemes() if s.name == "xnor")

    class SchemePlugin:
        @hookimpl
        def bnnslim_schemes(self):  # type: ignore[no-untyped-def]
            yield SchemeSpec("myxnor", "xnor under another name", xnor.binarize_input, xnor.binarize_weight,
                             xnor.scale)

    register(SchemePlugin(), "myxnor-plugin", "bnnslim-myxnor", "1.2")
    register(strategy_plugin("first", lambda ctx: Selection(torch.arange(ctx.group.size) < 4)), "first-plugin",
             "bnnslim-first", "0.3")
    (tmp_path / "tiny.py").write_text(textwrap.dedent(TINY_MODEL))
    assert cli("binarize", "tiny.py", "--scheme", "myxnor", "--data", "fashion-mnist-mini", "--steps-per-epoch",
               "2", "--batch-size", "32").exit_code == 0
    assert cli("prune", "--keep", "0.5", "--strategy", "first", *QUICK, "--finetune-steps", "0").exit_code == 0
    assert cli("export", "--no-evaluate", "-f", "plain").exit_code == 0
    manifest = json.loads((tmp_path / "bnnslim-run" / "manifest.json").read_text())
    assert manifest["plugins"]["scheme"] == {"name": "myxnor", "plugin": "myxnor-plugin",
                                             "distribution": "bnnslim-myxnor", "version": "1.2", "builtin": False}
    assert manifest["plugins"]["dataset"]["builtin"] is True
    assert manifest["prune"]["strategy_plugin"]["distribution"] == "bnnslim-first"

    plugins.reset_plugin_manager()  # a fresh manager: built-ins only, as after uninstalling the plugins
    assert_clean_error(cli("export", "--no-evaluate", "-f", "plain"),
                       "scheme 'myxnor' came from the plugin bnnslim-myxnor 1.2, which is not installed",
                       "pip install bnnslim-myxnor")
    with pytest.raises(BnnslimError, match="pip install bnnslim-myxnor"):
        bnnslim.load(tmp_path / "bnnslim-run" / "model.safetensors", model=str(tmp_path / "tiny.py"))
