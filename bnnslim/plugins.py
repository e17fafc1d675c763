"""The plugin manager: built-in plugins, then third-party entry points.

Built-in plugins are registered exactly like third-party ones, from the list
:data:`BUILTIN_PLUGINS`; external ones come from the entry-point group
``bnnslim``. Set ``BNNSLIM_DISABLE_EXTERNAL_PLUGINS=1`` to load built-ins only.
The manager is created on first use and cached (:func:`reset_plugin_manager`
forgets it).

A broken plugin does not disable the others. A plugin that fails to import or
to register, or implements an unknown hook, is left out; one whose hook raises
or returns the wrong type contributes nothing to that hook; a name that two
plugins provide is ambiguous. Each problem is recorded (:func:`problems`,
``bnnslim plugins`` lists it, naming the plugin and its distribution) and
becomes a :class:`~bnnslim.errors.BnnslimError` only for a command that needs
it: choosing an ambiguous name, or a name no working plugin provides (the error
then lists the problems). Strategies that raise or return an invalid selection
while ``bnnslim prune`` runs are errors naming the plugin.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.metadata
import inspect
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from bnnslim import hookspecs
from bnnslim._version import __version__
from bnnslim.errors import BnnslimError
from bnnslim.plugin_types import (
    CommandSpec,
    DatasetSpec,
    DatasetSplits,
    ModelSourceSpec,
    PrunerSpec,
    SchemeSpec,
    Selection,
    SelectionContext,
    StrategySpec,
)

if TYPE_CHECKING:
    from torch_pruning.pruner.function import BasePruningFunc

    from bnnslim.prune.groups import PrunableGroup

BUILTIN_PLUGINS: tuple[str, ...] = (
    "bnnslim.default_plugins.datasets",
    "bnnslim.default_plugins.schemes",
    "bnnslim.default_plugins.strategies",
    "bnnslim.default_plugins.models",
    "bnnslim.default_plugins.zoo",
)
DISABLE_EXTERNAL_ENV = "BNNSLIM_DISABLE_EXTERNAL_PLUGINS"

#: Each hook and the type of the objects it returns.
HOOKS: dict[str, type] = {
    "bnnslim_datasets": DatasetSpec,
    "bnnslim_schemes": SchemeSpec,
    "bnnslim_strategies": StrategySpec,
    "bnnslim_model_sources": ModelSourceSpec,
    "bnnslim_pruners": PrunerSpec,
    "bnnslim_commands": CommandSpec,
}

T = TypeVar("T")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")  # model source prefixes and command names


@dataclass(frozen=True)
class PluginInfo:
    """Who a registered plugin is: its name and the distribution that installed it."""

    name: str  # entry-point name, built-in module name, or the name given to pm.register
    distribution: str = ""  # "" for an object registered in code
    version: str = ""
    builtin: bool = False

    @property
    def label(self) -> str:
        """How messages name the plugin."""
        if self.builtin:
            return "bnnslim (built-in)"
        if self.distribution:
            return f"plugin '{self.name}' ({self.distribution} {self.version})".replace(" )", ")")
        return f"plugin '{self.name}'"

    @property
    def fix(self) -> str:
        """What a user can do about a broken plugin."""
        if self.builtin:
            return "this is a bug in bnnslim: please report it"
        what = self.distribution or self.name
        return f"fix or uninstall {what}, or set {DISABLE_EXTERNAL_ENV}=1 to load built-in plugins only"


_INFO: dict[str, PluginInfo] = {}  # registration name -> info, for the cached manager


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that failed to load (``hook`` is "") or whose hook failed."""

    info: PluginInfo
    message: str  # one line, naming the plugin
    hook: str = ""


_BROKEN: list[PluginProblem] = []  # plugins left out while loading, for the cached manager
_HOOK_FAILURES: dict[tuple[str, str], PluginProblem] = {}  # (plugin name, hook) -> problem, as last collected


def problems() -> list[PluginProblem]:
    """Plugins left out while loading, then hooks that failed the last time they were called."""
    get_plugin_manager()
    return [*_BROKEN, *_HOOK_FAILURES.values()]


def external_plugins_disabled() -> bool:
    """Whether ``BNNSLIM_DISABLE_EXTERNAL_PLUGINS`` blocks entry points."""
    return os.environ.get(DISABLE_EXTERNAL_ENV, "").strip().lower() not in ("", "0", "false", "no")


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built-ins, then entry points)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs.BnnslimSpecs)
    _INFO.clear()
    _BROKEN.clear()
    _HOOK_FAILURES.clear()
    for module_name in BUILTIN_PLUGINS:
        info = PluginInfo(module_name, "bnnslim", __version__, builtin=True)
        _register(pm, importlib.import_module(module_name), info)
    if not external_plugins_disabled():
        _load_entry_points(pm)
    _check_hook_names(pm)
    return pm


def reset_plugin_manager() -> None:
    """Forget the cached manager (tests use this after changing the environment)."""
    get_plugin_manager.cache_clear()
    _INFO.clear()
    _BROKEN.clear()
    _HOOK_FAILURES.clear()


def _dist_of(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "", ""
    return dist.name, dist.version


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register every entry point that loads; record (and leave out) each one that does not."""
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
        dist, version = _dist_of(ep)
        info = PluginInfo(ep.name, dist, version)
        try:
            _load_entry_point(pm, ep, info)
        except BnnslimError as exc:
            _BROKEN.append(PluginProblem(info, exc.one_line()))


def _load_entry_point(pm: pluggy.PluginManager, ep: importlib.metadata.EntryPoint, info: PluginInfo) -> None:
    known = _INFO.get(ep.name)
    if known is not None:
        if known.distribution == info.distribution:  # the same distribution found twice on sys.path
            return
        raise BnnslimError(f"two distributions register a bnnslim plugin called '{ep.name}': "
                           f"{known.distribution or known.name} and {info.distribution or '?'}; the second is "
                           "not loaded", "uninstall one of them")
    try:
        plugin = ep.load()
    except Exception as exc:  # a broken third-party plugin must be named, not crash bnnslim
        raise BnnslimError(
            f"plugin '{ep.name}' from distribution '{info.distribution or '?'}' failed to import ({ep.value}): "
            f"{type(exc).__name__}: {exc}",
            info.fix,
        ) from exc
    _register(pm, plugin, info)


def _register(pm: pluggy.PluginManager, plugin: object, info: PluginInfo) -> None:
    try:
        pm.register(plugin, name=info.name)
    except Exception as exc:  # pluggy.PluginValidationError (bad hook signature), ValueError (registered twice)
        # pluggy's message spans lines, and for a second registration ends with a dict of every plugin
        reason = " ".join(line.strip() for line in str(exc).splitlines() if not line.startswith("{"))
        raise BnnslimError(f"{info.label} could not be registered: {reason}", info.fix) from exc
    _INFO[info.name] = info


def _check_hook_names(pm: pluggy.PluginManager) -> None:
    """Like tox's ``check_pending``: a plugin with a misspelled hook is left out, with a problem naming the hook."""
    for _name, plugin in list(pm.list_name_plugin()):
        for caller in pm.get_hookcallers(plugin) or ():
            if caller.name in HOOKS:
                continue
            close = difflib.get_close_matches(caller.name, HOOKS, n=1)
            hint = f"did you mean {close[0]}?" if close else f"bnnslim's hooks are {', '.join(HOOKS)}"
            info = plugin_info(pm, plugin)
            problem = BnnslimError(f"{info.label} implements '{caller.name}', which is not a bnnslim hook",
                                   f"{hint} ({info.fix})")
            if info.builtin:
                raise problem
            pm.unregister(plugin)
            _BROKEN.append(PluginProblem(info, problem.one_line()))
            break


def plugin_info(pm: pluggy.PluginManager, plugin: object) -> PluginInfo:
    """The :class:`PluginInfo` of a registered plugin (a bare name for objects registered in code)."""
    name = pm.get_name(plugin) or repr(plugin)
    return _INFO.get(name) or PluginInfo(name)


def plugin_label(pm: pluggy.PluginManager, plugin: object) -> str:
    """A human name for a registered plugin: its distribution when it has one."""
    return plugin_info(pm, plugin).label


@dataclass(frozen=True)
class Provided:
    """One object provided through a hook, with the plugin that provided it."""

    spec: Any
    provider: str
    info: PluginInfo = field(default_factory=lambda: PluginInfo("?"))
    conflict: str = ""  # the providers, when more than one plugin provides this name


def _check_item(item: Any) -> str | None:
    """What is wrong with a returned spec beyond its type, or None."""
    if isinstance(item, PrunerSpec) and not inspect.isclass(item.layer_type):
        return f"a PrunerSpec whose layer_type is a {type(item.layer_type).__name__}, not a class"
    name = getattr(item, "name", None)
    if not isinstance(name, str) or not name.strip():
        return f"a {type(item).__name__} without a name"
    callables = {DatasetSpec: ("build",), SchemeSpec: ("binarize_input", "binarize_weight", "scale"),
                 StrategySpec: ("select",), ModelSourceSpec: ("build",), CommandSpec: ("callback",)}
    for attr in callables.get(type(item), ()):
        if not callable(getattr(item, attr)):
            return f"{type(item).__name__} '{name}' whose {attr} is not callable"
    if isinstance(item, (ModelSourceSpec, CommandSpec)) and not _PREFIX_RE.match(name):
        return f"{type(item).__name__} '{name}': the name must be lower-case letters, digits, '-', '_' or '.'"
    if isinstance(item, PrunerSpec):
        from torch_pruning.pruner.function import BasePruningFunc

        if not isinstance(item.pruner, BasePruningFunc):
            return (f"a PrunerSpec for {item.name} whose pruner is a {type(item.pruner).__name__}, "
                    "not a torch_pruning BasePruningFunc instance")
    return None


def call_impl(pm: pluggy.PluginManager, impl: pluggy.HookImpl, hook_name: str, expected: type[T]) -> list[T]:
    """Call one plugin's implementation of ``hook_name`` and check what it returns."""
    info = plugin_info(pm, impl.plugin)
    try:
        result = impl.function()
        if result is not None and (isinstance(result, (str, bytes)) or not hasattr(result, "__iter__")):
            raise BnnslimError(f"{info.label} returned {type(result).__name__} from {hook_name}, expected an "
                               f"iterable of {expected.__name__}", f"yield the specs ({info.fix})")
        items = [] if result is None else list(result)  # a generator runs here
    except BnnslimError:
        raise
    except Exception as exc:
        raise BnnslimError(f"{info.label} raised in {hook_name}: {type(exc).__name__}: {exc}", info.fix) from exc
    for item in items:
        if not isinstance(item, expected):
            raise BnnslimError(
                f"{info.label} returned {type(item).__name__} from {hook_name}, expected {expected.__name__}",
                info.fix)
        problem = _check_item(item)
        if problem:
            raise BnnslimError(f"{info.label} returned {problem} from {hook_name}", info.fix)
    return items


def collect(hook_name: str, expected: type[T]) -> dict[str, Provided]:
    """Call every implementation of ``hook_name`` and index the results by (lower-case) name.

    Raises when a plugin raises, returns something that is not an ``expected``, or
    provides a name that another plugin already provides (naming both).
    """
    pm = get_plugin_manager()
    found: dict[str, Provided] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        info = plugin_info(pm, impl.plugin)
        _HOOK_FAILURES.pop((info.name, hook_name), None)
        try:
            items = call_impl(pm, impl, hook_name, expected)
        except BnnslimError as exc:
            if info.builtin:
                raise
            _HOOK_FAILURES[(info.name, hook_name)] = PluginProblem(info, exc.one_line(), hook_name)
            continue
        for item in items:
            name = item.name.strip().lower()  # type: ignore[attr-defined]
            if name in found:
                first = found[name]
                conflict = first.conflict or f"by {first.provider}"
                found[name] = Provided(first.spec, first.provider, first.info,
                                       conflict=f"{conflict} and by {info.label}")
                continue
            found[name] = Provided(item, info.label, info)
    return found


def _conflict_error(hook_name: str, name: str, provided: Provided) -> BnnslimError:
    return BnnslimError(f"'{name}' is provided twice by {hook_name}: {provided.conflict}", "uninstall one of the two")


def _problems_note() -> str:
    found = problems()
    if not found:
        return ""
    return f"; {len(found)} plugin problem(s) may explain it, first: {found[0].message}"


#: the hook behind each kind that :func:`choose` is asked for
KIND_HOOKS = {"dataset": "bnnslim_datasets", "scheme": "bnnslim_schemes", "strategy": "bnnslim_strategies",
              "model source": "bnnslim_model_sources", "pruner": "bnnslim_pruners", "command": "bnnslim_commands"}


def choose(kind: str, name: str, options: dict[str, Provided], recorded: Any = None) -> Any:
    """Return the spec called ``name``; an error that lists the known names (and plugin problems), or an ambiguity.

    ``recorded`` is the :func:`provenance` a run or file stored (ignored unless it
    names ``name``): when the plugin that provided it is not installed now, the
    error says what to install.
    """
    key = name.strip().lower()
    if key not in options:
        about_it = isinstance(recorded, dict) and str(recorded.get("name", "")).strip().lower() == key
        dist = recorded.get("distribution") if about_it and not recorded.get("builtin") else None
        if isinstance(dist, str) and dist:
            version = recorded.get("version")
            was = f"{dist} {version}" if isinstance(version, str) and version else dist
            raise BnnslimError(f"{kind} '{name}' came from the plugin {was}, which is not installed here",
                               f"pip install {dist} (the run used {was}){_problems_note()}")
        known = ", ".join(sorted(options)) or "none"
        raise BnnslimError(f"unknown {kind} '{name}'", f"choose one of: {known}{_problems_note()}")
    if options[key].conflict:
        raise _conflict_error(KIND_HOOKS.get(kind, kind), key, options[key])
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


def model_sources() -> dict[str, Provided]:
    """All model sources, by prefix."""
    return collect("bnnslim_model_sources", ModelSourceSpec)


def pruners() -> dict[str, Provided]:
    """All custom-layer pruners, by the layer type's qualified name."""
    return collect("bnnslim_pruners", PrunerSpec)


def commands() -> dict[str, Provided]:
    """All extra commands, by name."""
    return collect("bnnslim_commands", CommandSpec)


def customized_pruners() -> dict[type, BasePruningFunc]:
    """``{layer_type: pruner}`` for torch-pruning's ``build_dependency(customized_pruners=...)``."""
    found = pruners()
    failed = [p for p in problems() if p.hook == "bnnslim_pruners"]
    if failed:  # a missing pruner would make torch-pruning mishandle that layer: refuse instead
        raise BnnslimError(failed[0].message)
    for name, p in found.items():
        if p.conflict:
            raise _conflict_error("bnnslim_pruners", name, p)
    return {p.spec.layer_type: p.spec.pruner for p in found.values()}


def provenance(kind: str, name: str) -> dict[str, Any]:
    """Who provides the ``kind`` (dataset, scheme, strategy) called ``name``, as runs and files record it.

    ``{"name", "plugin", "distribution", "version", "builtin"}``; a later
    :func:`get_scheme` (etc.) given this record says what to install when the
    plugin is gone.
    """
    options = {"dataset": datasets, "scheme": schemes, "strategy": strategies}[kind]()
    provided = options.get(name.strip().lower())
    if provided is None:
        return {"name": name}
    info = provided.info
    return {"name": name, "plugin": info.name, "distribution": info.distribution, "version": info.version,
            "builtin": info.builtin}


def recorded_plugin(manifest: Any, kind: str) -> Any:
    """The provenance a run's manifest (``plugins.KIND``) or a file's header records for ``kind``, else None."""
    plugins = manifest.get("plugins") if isinstance(manifest, dict) else None
    return plugins.get(kind) if isinstance(plugins, dict) else None


def get_dataset(name: str, recorded: Any = None) -> DatasetSpec:
    """The dataset called ``name``, its ``build`` guarded so that a failing plugin is named."""
    options = datasets()
    spec: DatasetSpec = choose("dataset", name, options, recorded)
    return guard_dataset(spec, options[name.strip().lower()].info)


def get_scheme(name: str, recorded: Any = None) -> SchemeSpec:
    """The scheme called ``name``; a plugin's scheme guarded so that its failures name the plugin, not the model."""
    options = schemes()
    spec: SchemeSpec = choose("scheme", name, options, recorded)
    info = options[name.strip().lower()].info
    return spec if info.builtin else guard_scheme(spec, info)


def guard_dataset(spec: DatasetSpec, info: PluginInfo) -> DatasetSpec:
    """``spec`` whose ``build`` (and ``build_at``) names the plugin when it raises, and refuses anything but two
    datasets."""

    def guard(build: Any) -> Any:
        def guarded(*args: Any) -> DatasetSplits:
            try:
                splits = build(*args)
            except BnnslimError:
                raise
            except Exception as exc:
                if info.builtin:
                    raise
                raise BnnslimError(f"dataset '{spec.name}' from {info.label} failed to build: "
                                   f"{type(exc).__name__}: {exc}", info.fix) from exc
            parts = (getattr(splits, "train", None), getattr(splits, "test", None))
            if not isinstance(splits, DatasetSplits) or not all(
                    hasattr(d, "__len__") and hasattr(d, "__getitem__") for d in parts):
                raise BnnslimError(f"dataset '{spec.name}' from {info.label} returned {type(splits).__name__} from "
                                   "build, not DatasetSplits(train, test) of two map-style datasets", info.fix)
            return splits

        return guarded

    return dataclasses.replace(spec, build=guard(spec.build),
                               build_at=guard(spec.build_at) if spec.build_at is not None else None)


def guard_scheme(spec: SchemeSpec, info: PluginInfo) -> SchemeSpec:
    """``spec`` whose functions name the plugin when they raise (instead of the user's model)."""

    def guard(fn: Any, what: str) -> Any:
        @functools.wraps(fn)
        def guarded(*args: Any) -> Any:
            try:
                return fn(*args)
            except BnnslimError:
                raise
            except Exception as exc:
                raise BnnslimError(f"scheme '{spec.name}' from {info.label} failed in {what}: "
                                   f"{type(exc).__name__}: {exc}", info.fix) from exc

        return guarded

    return dataclasses.replace(spec, binarize_input=guard(spec.binarize_input, "binarize_input"),
                               binarize_weight=guard(spec.binarize_weight, "binarize_weight"),
                               scale=guard(spec.scale, "scale"))


def get_strategy(name: str, recorded: Any = None) -> StrategySpec:
    """The strategy called ``name``, its ``select`` guarded so that failures name the plugin."""
    options = strategies()
    spec: StrategySpec = choose("strategy", name, options, recorded)
    return guard_strategy(spec, options[name.strip().lower()].info)


def guard_strategy(spec: StrategySpec, info: PluginInfo | None = None) -> StrategySpec:
    """``spec`` with a ``select`` that turns a crash or an invalid :class:`Selection` into an error naming the plugin.

    A :class:`BnnslimError` the strategy raises itself passes through unchanged.
    """
    select = spec.select
    info = info or PluginInfo(spec.name)

    def guarded(ctx: SelectionContext) -> Selection:
        where = f"strategy '{spec.name}' from {info.label} on group {ctx.group.id}"
        fix = info.fix if info.builtin else (
            f"fix or uninstall {info.distribution or info.name}, or choose another --strategy")
        try:
            raw = select(ctx)
        except BnnslimError:
            raise
        except Exception as exc:
            raise BnnslimError(f"{where} failed: {type(exc).__name__}: {exc}", fix) from exc
        try:
            return validate_selection(raw, spec, ctx.group)
        except BnnslimError as exc:
            problem = exc.problem.replace(f"strategy '{spec.name}' on group {ctx.group.id}", where)
            raise BnnslimError(problem, f"{exc.fix} ({fix})" if exc.fix else fix) from None

    return StrategySpec(name=spec.name, description=spec.description, select=guarded)


def find_model_source(prefix: str) -> Provided | None:
    """The model source registered under ``prefix`` (case-insensitive), or None; an error if two provide it."""
    key = prefix.strip().lower()
    found = model_sources().get(key)
    if found is not None and found.conflict:
        raise _conflict_error("bnnslim_model_sources", key, found)
    return found


@dataclass
class PluginReport:
    """One registered plugin and what it provides (for ``bnnslim plugins``)."""

    info: PluginInfo
    provides: dict[str, list[str]] = field(default_factory=dict)  # hook -> names
    errors: dict[str, str] = field(default_factory=dict)  # hook -> error message


def describe_plugins() -> list[PluginReport]:
    """Every plugin with the names it provides per hook; failures and name conflicts are reported, not raised.

    Plugins left out while loading come last, with their error under ``"load"``.
    """
    pm = get_plugin_manager()
    reports = []
    providers: dict[tuple[str, str], str] = {}  # (hook, name) -> first provider
    for _name, plugin in pm.list_name_plugin():
        report = PluginReport(plugin_info(pm, plugin))
        for hook_name, expected in HOOKS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    items: list[Any] = call_impl(pm, impl, hook_name, expected)
                except BnnslimError as exc:
                    report.errors[hook_name] = exc.one_line()
                    continue
                names = [item.name for item in items]
                report.provides[hook_name] = names
                taken = [n for n in names if (hook_name, n.strip().lower()) in providers]
                if taken:
                    first = providers[(hook_name, taken[0].strip().lower())]
                    report.errors[hook_name] = (f"'{taken[0]}' is also provided by {first}: a command that asks "
                                                "for it fails until one of the two is uninstalled")
                for n in names:
                    providers.setdefault((hook_name, n.strip().lower()), report.info.label)
        reports.append(report)
    reports += [PluginReport(p.info, errors={"load": p.message}) for p in _BROKEN]
    return reports


def validate_selection(selection: Any, spec: StrategySpec, group: PrunableGroup) -> Selection:
    """``selection`` as a clean :class:`Selection` (one finite score per channel, a count in range), or an error."""
    import torch

    where = f"strategy '{spec.name}' on group {group.id}"
    if not isinstance(selection, Selection):
        raise BnnslimError(f"{where} returned {type(selection).__name__}, not a Selection", "fix the strategy plugin")
    scores = torch.as_tensor(selection.scores).detach().flatten().float().cpu()
    if scores.numel() != group.size:
        raise BnnslimError(f"{where} returned {scores.numel()} scores for {group.size} channels",
                           "return one score per channel of the group's root")
    if not torch.isfinite(scores).all():
        raise BnnslimError(f"{where} returned non-finite scores", "fix the strategy plugin")
    if selection.keep is not None and not 0 <= int(selection.keep) <= group.size:
        raise BnnslimError(f"{where} proposed keeping {selection.keep} of {group.size} channels",
                           "propose a count between 0 and the group's size, or None")
    return Selection(scores=scores, keep=None if selection.keep is None else int(selection.keep),
                     state=dict(selection.state))
