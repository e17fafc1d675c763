"""The plugin manager: loading, caching, the hooks' contracts, and every way a plugin can be wrong."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bnnslim import hookspecs, plugins
from bnnslim.errors import BnnslimError
from bnnslim.hookspecs import hookimpl
from bnnslim.plugin_types import (
    CommandSpec,
    DatasetSpec,
    ModelSourceSpec,
    PrunerSpec,
    SchemeSpec,
    StrategySpec,
)

REPO = Path(__file__).resolve().parents[1]
HOOK_NAMES = sorted(n for n in vars(hookspecs.BnnslimSpecs) if n.startswith("bnnslim_"))

Register = Callable[..., object]


@pytest.fixture
def register() -> Iterator[Register]:
    """``register(plugin, name)`` on the cached manager; unregistered (and the cache reset) afterwards."""
    pm = plugins.get_plugin_manager()
    added: list[object] = []

    def reg(plugin: object, name: str) -> object:
        pm.register(plugin, name=name)
        added.append(plugin)
        return plugin

    yield reg
    for plugin in added:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
    plugins.reset_plugin_manager()


@pytest.fixture
def fresh_manager() -> Iterator[None]:
    """A manager built from scratch in the test, forgotten afterwards."""
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()


class FakeDist:
    def __init__(self, name: str, version: str = "1.0") -> None:
        self.name, self.version = name, version


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, *eps: importlib.metadata.EntryPoint) -> None:
    """Make ``bnnslim.plugins`` see exactly ``eps`` in the ``bnnslim`` group (external plugins enabled)."""
    monkeypatch.delenv(plugins.DISABLE_EXTERNAL_ENV, raising=False)
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points",
                        lambda group=None: [ep for ep in eps if group in (None, ep.group)])


def entry_point(name: str, value: str, dist: str) -> importlib.metadata.EntryPoint:
    ep = importlib.metadata.EntryPoint(name=name, value=value, group="bnnslim")
    return ep._for(FakeDist(dist))  # type: ignore[attr-defined]  # how importlib.metadata attaches the dist


def problem_text() -> str:
    return "\n".join(p.message for p in plugins.problems())


# -- loading --------------------------------------------------------------------------------------------------


def test_builtins_are_registered_like_plugins_from_the_list(fresh_manager: None) -> None:
    pm = plugins.get_plugin_manager()
    names = [name for name, _ in pm.list_name_plugin()]
    assert names == list(plugins.BUILTIN_PLUGINS)  # the env var of conftest blocks the entry points
    for _, plugin in pm.list_name_plugin():
        info = plugins.plugin_info(pm, plugin)
        assert info.builtin and info.distribution == "bnnslim"


def test_installed_plugins_are_discovered_once_until_reset(monkeypatch: pytest.MonkeyPatch,
                                                           fresh_manager: None) -> None:
    """Entry points are scanned on first use only (not at import, not per command step); reset scans again."""
    scans: list[str | None] = []
    monkeypatch.delenv(plugins.DISABLE_EXTERNAL_ENV, raising=False)
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda group=None: scans.append(group) or [])
    assert scans == []
    plugins.get_dataset("fashion-mnist-mini")
    plugins.get_scheme("xnor")
    assert scans == ["bnnslim"]
    plugins.reset_plugin_manager()
    plugins.get_scheme("xnor")
    assert scans == ["bnnslim", "bnnslim"]


def test_environment_variable_blocks_external_plugins(monkeypatch: pytest.MonkeyPatch, fresh_manager: None) -> None:
    fake_entry_points(monkeypatch, entry_point("broken", "no_such_module_xyz", "bnnslim-broken"))
    monkeypatch.setenv(plugins.DISABLE_EXTERNAL_ENV, "1")
    assert "broken" not in dict(plugins.get_plugin_manager().list_name_plugin())
    plugins.reset_plugin_manager()
    monkeypatch.setenv(plugins.DISABLE_EXTERNAL_ENV, "0")
    assert "broken" in problem_text()


def test_plugin_failing_to_import_is_named(monkeypatch: pytest.MonkeyPatch, fresh_manager: None) -> None:
    fake_entry_points(monkeypatch, entry_point("broken", "no_such_module_xyz", "bnnslim-broken"))
    assert plugins.get_dataset("fashion-mnist-mini")  # the other plugins keep working
    msg = problem_text()
    assert "plugin 'broken' from distribution 'bnnslim-broken' failed to import" in msg
    assert "ModuleNotFoundError" in msg and "no_such_module_xyz" in msg
    assert plugins.DISABLE_EXTERNAL_ENV in msg


def test_broken_distribution_on_sys_path_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  fresh_manager: None) -> None:
    """The real importlib.metadata path: a dist-info with an entry point whose module raises at import."""
    (tmp_path / "bnnslim_kaput.py").write_text("raise RuntimeError('kaput at import')\n")
    info = tmp_path / "bnnslim_kaput-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bnnslim-kaput\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[bnnslim]\nkaput = bnnslim_kaput\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(plugins.DISABLE_EXTERNAL_ENV, raising=False)
    assert re.search(r"plugin 'kaput' from distribution 'bnnslim-kaput' failed to import "
                     r"\(bnnslim_kaput\): RuntimeError: kaput at import", problem_text())
    with pytest.raises(BnnslimError, match="unknown dataset 'kaput-data'.*plugin problem.*kaput at import"):
        plugins.get_dataset("kaput-data")  # a command that needs it fails clearly
    sys.modules.pop("bnnslim_kaput", None)


def test_two_distributions_with_one_plugin_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 fresh_manager: None) -> None:
    for module in ("bnnslim_one", "bnnslim_two"):
        (tmp_path / f"{module}.py").write_text('"""An empty plugin."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_entry_points(monkeypatch, entry_point("same", "bnnslim_one", "dist-one"),
                      entry_point("same", "bnnslim_two", "dist-two"))
    assert "called 'same': dist-one and dist-two; the second is not loaded. uninstall one of them" in problem_text()
    assert plugins.get_plugin_manager().get_plugin("same") is sys.modules["bnnslim_one"]


def test_one_distribution_found_twice_on_the_path_is_loaded_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 fresh_manager: None) -> None:
    (tmp_path / "bnnslim_twice.py").write_text('"""An empty plugin."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = entry_point("twice", "bnnslim_twice", "bnnslim-twice")
    fake_entry_points(monkeypatch, ep, ep)
    assert plugins.get_plugin_manager().get_plugin("twice") is sys.modules["bnnslim_twice"]


def test_hook_with_parameters_cannot_register(register: Register) -> None:
    class Bad:
        @hookimpl
        def bnnslim_datasets(self, root):  # type: ignore[no-untyped-def]
            return []

    pm = plugins.get_plugin_manager()
    with pytest.raises(BnnslimError, match="plugin 'bad-args' could not be registered: .*root"):
        plugins._register(pm, Bad(), plugins.PluginInfo("bad-args"))


def test_misspelled_hook_is_named_with_a_suggestion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    fresh_manager: None) -> None:
    (tmp_path / "bnnslim_typo.py").write_text(textwrap.dedent("""
        from bnnslim.hookspecs import hookimpl
        @hookimpl
        def bnnslim_dataset():
            return []
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_entry_points(monkeypatch, entry_point("typo", "bnnslim_typo", "bnnslim-typo"))
    assert plugins.get_plugin_manager().get_plugin("typo") is None  # left out
    msg = problem_text()
    assert "plugin 'typo' (bnnslim-typo 1.0) implements 'bnnslim_dataset', which is not a bnnslim hook" in msg
    assert "did you mean bnnslim_datasets?" in msg
    sys.modules.pop("bnnslim_typo", None)


# -- what hooks return --------------------------------------------------------------------------------------------


def _strategy(name: str) -> StrategySpec:
    return StrategySpec(name, "test strategy", lambda ctx: None)  # type: ignore[arg-type,return-value]


def test_registered_test_plugin_is_used_and_removed(register: Register) -> None:
    class Extra:
        @hookimpl
        def bnnslim_strategies(self):  # type: ignore[no-untyped-def]
            yield _strategy("Extra-One")

    plugin = register(Extra(), "extra")
    found = plugins.strategies()
    assert found["extra-one"].provider == "plugin 'extra'"
    plugins.get_plugin_manager().unregister(plugin)
    assert "extra-one" not in plugins.strategies()


@pytest.mark.parametrize("returned, words", [
    (["not a spec"], "returned str from bnnslim_datasets, expected DatasetSpec"),
    ("fashion", "returned str from bnnslim_datasets, expected an iterable of DatasetSpec"),
    (42, "returned int from bnnslim_datasets, expected an iterable of DatasetSpec"),
    ([DatasetSpec("", "x", (1, 2, 2), 2, build=print)], "returned a DatasetSpec without a name"),
    ([DatasetSpec("x", "x", (1, 2, 2), 2, build="nope")],  # type: ignore[arg-type]
     "returned DatasetSpec 'x' whose build is not callable"),
])
def test_wrong_return_type_names_the_plugin(register: Register, returned: object, words: str) -> None:
    class Wrong:
        @hookimpl
        def bnnslim_datasets(self):  # type: ignore[no-untyped-def]
            return returned

    register(Wrong(), "wrong")
    assert "fashion-mnist-mini" in plugins.datasets()  # the others keep working
    assert f"plugin 'wrong' {words}" in problem_text()
    with pytest.raises(BnnslimError) as err:
        plugins.get_dataset("x")
    assert f"plugin 'wrong' {words}" in str(err.value)


def test_plugin_raising_in_a_hook_is_named(register: Register) -> None:
    class Raises:
        @hookimpl
        def bnnslim_schemes(self):  # type: ignore[no-untyped-def]
            yield from ()
            raise KeyError("no config")

    register(Raises(), "raiser")
    assert plugins.get_scheme("xnor").name == "xnor"  # one broken plugin does not disable the built-ins
    with pytest.raises(BnnslimError, match=r"plugin 'raiser' raised in bnnslim_schemes: KeyError: 'no config'"):
        plugins.get_scheme("raisers-scheme")


def test_duplicate_name_names_both_distributions(register: Register, monkeypatch: pytest.MonkeyPatch) -> None:
    class Dup:
        @hookimpl
        def bnnslim_strategies(self):  # type: ignore[no-untyped-def]
            yield _strategy("L1")

    register(Dup(), "dup")
    monkeypatch.setitem(plugins._INFO, "dup", plugins.PluginInfo("dup", "bnnslim-dup", "2.0"))
    assert "subsidiary" in plugins.strategies() and plugins.get_strategy("bn")
    with pytest.raises(BnnslimError) as err:
        plugins.get_strategy("l1")
    assert ("'l1' is provided twice by bnnslim_strategies: by bnnslim (built-in) and by plugin 'dup' "
            "(bnnslim-dup 2.0)") in str(err.value)


def test_duplicate_between_two_external_distributions(register: Register, monkeypatch: pytest.MonkeyPatch) -> None:
    def plugin(name: str) -> object:
        class P:
            @hookimpl
            def bnnslim_datasets(self):  # type: ignore[no-untyped-def]
                yield DatasetSpec("blobs", "x", (1, 4, 4), 2, build=print)
        return register(P(), name)

    plugin("a")
    plugin("b")
    monkeypatch.setitem(plugins._INFO, "a", plugins.PluginInfo("a", "bnnslim-a", "1.0"))
    monkeypatch.setitem(plugins._INFO, "b", plugins.PluginInfo("b", "bnnslim-b", "3.1"))
    with pytest.raises(BnnslimError, match=r"by plugin 'a' \(bnnslim-a 1.0\) and by plugin 'b' \(bnnslim-b 3.1\)"):
        plugins.get_dataset("blobs")


@pytest.mark.parametrize("spec, words", [
    (PrunerSpec(layer_type="Conv", pruner=object()), "layer_type is a str, not a class"),  # type: ignore[arg-type]
    (PrunerSpec(layer_type=dict, pruner=object()), "pruner is a object, not a torch_pruning BasePruningFunc"),  # type: ignore[arg-type]
])
def test_pruner_spec_is_checked(register: Register, spec: PrunerSpec, words: str) -> None:
    class Pr:
        @hookimpl
        def bnnslim_pruners(self):  # type: ignore[no-untyped-def]
            yield spec

    register(Pr(), "pr")
    with pytest.raises(BnnslimError, match=words):
        plugins.customized_pruners()


@pytest.mark.parametrize("hook, spec", [
    ("bnnslim_model_sources", ModelSourceSpec("my:zoo", "x", build=print)),
    ("bnnslim_commands", CommandSpec("Hello World", "x", callback=print)),
])
def test_names_that_the_command_line_cannot_parse_are_refused(register: Register, hook: str, spec: object) -> None:
    ns = {"hookimpl": hookimpl, "spec": spec}
    exec(f"class P:\n    @hookimpl\n    def {hook}(self):\n        yield spec\n", ns)
    register(ns["P"](), "p")
    assert plugins.collect(hook, plugins.HOOKS[hook]) == {} or hook == "bnnslim_model_sources"
    assert "the name must be lower-case letters" in problem_text()


# -- the hook specifications --------------------------------------------------------------------------------------


def _example(hook: str) -> str:
    doc = getattr(hookspecs.BnnslimSpecs, hook).__doc__ or ""
    assert "Example::" in doc, f"{hook} has no example"
    return textwrap.dedent(doc.split("Example::", 1)[1]).strip("\n")


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hookspec_example_runs_and_returns_its_type(hook: str) -> None:
    ns: dict[str, object] = {}
    exec(compile(_example(hook), f"<{hook} example>", "exec"), ns)
    items = list(ns[hook]())  # type: ignore[operator]
    assert items and all(isinstance(i, plugins.HOOKS[hook]) for i in items)
    plugins._check_item(items[0])  # raises for an item that breaks its contract


def test_hooks_table_lists_every_hookspec() -> None:
    assert sorted(plugins.HOOKS) == HOOK_NAMES


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hook_is_documented_in_the_plugin_guide(hook: str) -> None:
    guide = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    assert re.search(rf"^#+ `{hook}`$", guide, re.MULTILINE), f"docs/plugins.md has no section for {hook}"
    assert f"| `{hook}` |" in guide, f"the hook table of docs/plugins.md lacks {hook}"


def test_hookspec_types_are_the_plugin_types() -> None:
    assert plugins.HOOKS == {  # noqa: SIM300 - pytest order: actual == expected
        "bnnslim_datasets": DatasetSpec, "bnnslim_schemes": SchemeSpec, "bnnslim_strategies": StrategySpec,
        "bnnslim_model_sources": ModelSourceSpec, "bnnslim_pruners": PrunerSpec, "bnnslim_commands": CommandSpec,
    }
