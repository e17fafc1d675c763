"""The plugin manager: built-in plugins, then third-party entry points.

Built-in plugins are registered exactly like third-party ones, from the list
:data:`BUILTIN_PLUGINS`; external ones come from the entry-point group
``bnnslim``. Set ``BNNSLIM_DISABLE_EXTERNAL_PLUGINS=1`` to load built-ins only.
The manager is created on first use and cached.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import pluggy

from bnnslim import hookspecs
from bnnslim.errors import BnnslimError
from bnnslim.plugin_types import DatasetSpec, SchemeSpec, StrategySpec

BUILTIN_PLUGINS: tuple[str, ...] = (
    "bnnslim.default_plugins.datasets",
    "bnnslim.default_plugins.schemes",
    "bnnslim.default_plugins.strategies",
)
DISABLE_EXTERNAL_ENV = "BNNSLIM_DISABLE_EXTERNAL_PLUGINS"

T = TypeVar("T")
_DISTRIBUTIONS: dict[str, str] = {}  # entry-point name -> "distribution version"


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built-ins, then entry points)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs.BnnslimSpecs)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if os.environ.get(DISABLE_EXTERNAL_ENV, "") not in ("", "0"):
        return pm
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must be named, not crash
            dist = ep.dist.name if ep.dist else "?"
            raise BnnslimError(
                f"plugin '{ep.name}' from distribution '{dist}' failed to import: {exc}",
                f"uninstall or fix it, or set {DISABLE_EXTERNAL_ENV}=1 to load built-in plugins only",
            ) from exc
        pm.register(plugin, name=ep.name)
        _DISTRIBUTIONS[ep.name] = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ep.name
    pm.check_pending()
    return pm


def plugin_label(pm: pluggy.PluginManager, plugin: object) -> str:
    """A human name for a registered plugin: its distribution when it has one."""
    name = pm.get_name(plugin) or repr(plugin)
    if name in BUILTIN_PLUGINS:
        return "bnnslim (built-in)"
    return _DISTRIBUTIONS.get(name, name)


@dataclass(frozen=True)
class Provided:
    """One object provided through a hook, with the plugin that provided it."""

    spec: Any
    provider: str


def collect(hook_name: str, expected: type[T]) -> dict[str, Provided]:
    """Call every implementation of ``hook_name`` and index the results by name.

    Raises when a plugin returns something that is not an ``expected`` or when two
    plugins provide the same name (naming both).
    """
    pm = get_plugin_manager()
    hook = getattr(pm.hook, hook_name)
    found: dict[str, Provided] = {}
    for impl in hook.get_hookimpls():
        label = plugin_label(pm, impl.plugin)
        try:
            items = list(impl.function() or ())
        except BnnslimError:
            raise
        except Exception as exc:
            raise BnnslimError(
                f"plugin {label} raised in {hook_name}: {exc}", "fix or uninstall that plugin"
            ) from exc
        for item in items:
            if not isinstance(item, expected):
                raise BnnslimError(
                    f"plugin {label} returned {type(item).__name__} from {hook_name}, expected {expected.__name__}",
                    "fix or uninstall that plugin",
                )
            name = item.name.strip().lower()
            if name in found:
                raise BnnslimError(
                    f"'{name}' is provided twice by {hook_name}: by {found[name].provider} and by {label}",
                    "uninstall one of the two",
                )
            found[name] = Provided(item, label)
    return found


def choose(kind: str, name: str, options: dict[str, Provided]) -> Any:
    """Return the spec called ``name`` or raise an error that lists the known names."""
    key = name.strip().lower()
    if key not in options:
        known = ", ".join(sorted(options)) or "none"
        raise BnnslimError(f"unknown {kind} '{name}'", f"choose one of: {known}")
    return options[key].spec


def datasets() -> dict[str, Provided]:
    """All datasets, by name."""
    return collect("bnnslim_datasets", DatasetSpec)


def schemes() -> dict[str, Provided]:
    """All binarization schemes, by name."""
    return collect("bnnslim_schemes", SchemeSpec)


def strategies() -> dict[str, Provided]:
    """All selection strategies, by name."""
    return collect("bnnslim_strategies", StrategySpec)


def get_strategy(name: str) -> StrategySpec:
    return choose("strategy", name, strategies())


def get_dataset(name: str) -> DatasetSpec:
    return choose("dataset", name, datasets())


def get_scheme(name: str) -> SchemeSpec:
    return choose("scheme", name, schemes())


def reset_plugin_manager() -> None:
    """Forget the cached manager (tests use this after registering plugins)."""
    get_plugin_manager.cache_clear()


