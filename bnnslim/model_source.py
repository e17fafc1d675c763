"""Load the user's model from a Python file: ``FILE[:NAME]``.

How the model is found in ``FILE`` (the first rule that applies):

1. ``FILE:NAME`` names a callable (called, see below) or an ``nn.Module`` instance.
2. A function ``build_model``.
3. A module-level ``nn.Module`` instance called ``model``.
4. The one ``nn.Module`` subclass defined in the file that needs no arguments.

A factory (function or class) that accepts ``num_classes`` or ``in_channels``
keyword arguments gets them from the dataset, so one model file serves
Fashion-MNIST (1 channel) and CIFAR-10 (3 channels).

The file may set ``INPUT_SHAPE = (C, H, W)``: the shape of one input without the
batch dimension, used when no dataset or ``--input-shape`` gives it.

``PREFIX:NAME`` where ``PREFIX`` is a model source from a plugin (built in:
``torchvision``) and no such file exists builds model ``NAME`` of that source
(``bnnslim_model_sources`` hook). Its :class:`ModelSource` has ``path =
Path(PREFIX)`` (relative, where a model file's is absolute), so ``f"{path}:{name}"``
is the spec in both cases; its "sha256" hashes the source, the name and the
providing plugin's distribution and version, so a run directory notices when the
plugin changed.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
import json
import re
import sys
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from bnnslim.errors import BnnslimError

if TYPE_CHECKING:
    from bnnslim.plugins import Provided

DEFAULT_FACTORY = "build_model"
DEFAULT_INSTANCE = "model"
_SOURCE_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and how to build it."""

    path: Path  # the model file; for a plugin's model, Path(PREFIX)
    name: str  # the attribute that builds the model; for a plugin's model, NAME
    sha256: str  # of the file's bytes; for a plugin's model, of its identity (see the module docstring)
    input_shape: tuple[int, ...] | None  # INPUT_SHAPE from the file, or the source's default
    factory: Callable[..., nn.Module]
    provider: str = ""  # the plugin that provides the model ("" for a file)

    @property
    def spec(self) -> str:
        """``FILE:NAME`` (or ``PREFIX:NAME``) as the command line accepts it."""
        return f"{self.path}:{self.name}"

    @property
    def where(self) -> str:
        """How messages name the model's origin: the file name, or the spec and its plugin."""
        return f"{self.spec} (from {self.provider})" if self.provider else self.path.name

    def build(self, num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
        """Build a fresh model, passing ``num_classes``/``in_channels`` when the factory takes them."""
        offered = {"num_classes": num_classes, "in_channels": in_channels}
        kwargs = {k: v for k, v in offered.items() if v and _accepts(self.factory, k)}
        try:
            model = self.factory(**kwargs)
        except BnnslimError:
            raise
        except SystemExit as exc:
            raise BnnslimError(f"building the model with {self.name}() called sys.exit({exc.code!r})",
                               f"return the model from {self.name} in {self.path.name} instead") from None
        except Exception as exc:
            raise BnnslimError(
                f"building the model with {self.name}({_kwargs_text(kwargs)}) failed: {_user_frame(exc, self.path)}",
                f"fix {self.path.name}",
            ) from exc
        if not isinstance(model, nn.Module):
            raise BnnslimError(f"{self.name} in {self.where} returned {type(model).__name__}, not an nn.Module",
                               "return the model from it")
        return model


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def split_spec(spec: str) -> tuple[Path, str | None]:
    """``"models/net.py:build"`` -> (Path("models/net.py"), "build"); the name is optional."""
    path, sep, name = spec.rpartition(":")
    if sep and path and name.isidentifier():
        return Path(path), name
    return Path(spec), None


def load_model_source(spec: str, expected_sha256: str | None = None) -> ModelSource:
    """Import ``FILE[:NAME]`` and find the model in it, or build ``PREFIX:NAME`` from a plugin's model source.

    ``spec`` is what the user typed: a relative ``FILE`` is resolved against the
    current directory. Never pass a spec that a file (a header, a manifest) names:
    :mod:`bnnslim.trust` decides what such a file may make bnnslim run.
    """
    path, name = split_spec(spec)
    prefix, sep, rest = spec.partition(":")
    plugin_like = bool(sep) and bool(_SOURCE_PREFIX.match(prefix)) and not path.is_file() and not Path(spec).is_file()
    if plugin_like:
        from bnnslim.plugins import find_model_source

        # a source's prefix wins over a folder of the same name (e.g. ./bnnslim or ./torchvision)
        provided = find_model_source(prefix)
        if provided is not None:
            return load_plugin_model(provided, rest, expected_sha256)
    if path.is_dir() or (name is None and Path(spec).is_dir()):
        raise BnnslimError(f"'{path}' is a directory, not a model file",
                           "give the path of a .py file that builds your model")
    if not path.is_file() and not Path(spec).is_file():
        if plugin_like:
            from bnnslim.plugins import model_sources

            known = sorted(model_sources())
            close = difflib.get_close_matches(prefix.lower(), known, n=1)
            hint = f"did you mean {close[0]}:{rest}? " if close else ""
            raise BnnslimError(f"'{spec}' is not a model file, and '{prefix}' is not a model source",
                               f"{hint}give the path of a .py file, or PREFIX:NAME with a model source "
                               f"({', '.join(known) or 'none installed'})")
        raise BnnslimError(f"model file '{path}' not found", "give the path of a .py file that builds your model")
    return load_model_file(path, name, expected_sha256)


def load_model_file(path: Path, name: str | None = None, expected_sha256: str | None = None, *,
                    models_only: bool = False) -> ModelSource:
    """Run the Python source file ``path`` (a ``.py`` file, nothing else) and find the model in it.

    The bytes that are hashed are the bytes that run: the file is read once,
    checked against ``expected_sha256`` (when given) and compiled from those
    bytes, so no cached bytecode (``__pycache__``) and no later change to the
    file can slip in. ``models_only`` (for a name that a file recorded rather than
    the user typed) lets ``name`` pick only ``build_model``, an ``nn.Module``
    subclass or an ``nn.Module`` instance: never another function.
    """
    path = Path(path).resolve()
    if path.suffix != ".py":
        raise BnnslimError(f"'{path}' is not a Python source file (.py)",
                           "bnnslim imports model code only from .py files, never .pyc, .so or other files")
    try:
        code = path.read_bytes()
    except OSError as exc:
        raise BnnslimError(f"cannot read model file '{path}': {exc.strerror or exc}",
                           "check the path and its permissions") from exc
    digest = hashlib.sha256(code).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise BnnslimError(
            f"model file '{path}' changed since the run directory was made or the model exported (its sha256 "
            "differs from the recorded one)",
            "restore the file, or start a new run with --run DIR",
        )
    module = _import_file(path, code, digest)
    name, factory = _find_model(module, path, name, models_only)
    input_shape = getattr(module, "INPUT_SHAPE", None)
    if input_shape is not None:
        try:
            input_shape = tuple(int(d) for d in input_shape)
        except (TypeError, ValueError) as exc:
            raise BnnslimError(f"INPUT_SHAPE in {path.name} must be a tuple of ints like (3, 32, 32)",
                               "fix it or remove it") from exc
    return ModelSource(path=path, name=name, sha256=digest, input_shape=input_shape, factory=factory)


def plugin_model_identity(provided: Provided, model_name: str) -> str:
    """What a run records for a plugin's model: source, name, providing distribution and versions, hashed."""
    info = provided.info
    identity = {"model_source": provided.spec.name, "model": model_name,
                "distribution": info.distribution or info.name, "version": info.version,
                "source_version": provided.spec.version}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def load_plugin_model(provided: Provided, model_name: str, expected_sha256: str | None = None) -> ModelSource:
    """The :class:`ModelSource` of model ``model_name`` of the plugin model source ``provided``."""
    source = provided.spec
    model_name = model_name.strip()
    spec = f"{source.name}:{model_name}"
    if not model_name:
        raise BnnslimError(f"no model name after '{source.name}:'", f"give one, e.g. {source.name}:NAME")
    if source.list_models is not None:
        try:
            names = [str(n) for n in source.list_models()]
        except BnnslimError:
            raise
        except Exception as exc:
            raise BnnslimError(f"listing the models of '{source.name}' failed in {provided.provider}: "
                               f"{type(exc).__name__}: {exc}", provided.info.fix) from exc
        if model_name not in names:
            close = difflib.get_close_matches(model_name, names, n=5)
            raise BnnslimError(f"model source '{source.name}' has no model '{model_name}'",
                               f"did you mean {', '.join(close)}?" if close else
                               f"choose one of: {', '.join(names[:30])}{' ...' if len(names) > 30 else ''}")
    digest = plugin_model_identity(provided, model_name)
    if expected_sha256 is not None and digest != expected_sha256:
        raise BnnslimError(
            f"model '{spec}' is now provided by {provided.provider} ({source.version or 'no source version'}), "
            "which differs from the plugin the run directory was made with",
            "install the plugin version the run was made with, or start a new run with --run DIR",
        )

    def factory(num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
        try:
            return source.build(model_name, num_classes, in_channels)
        except BnnslimError:
            raise
        except Exception as exc:
            raise BnnslimError(f"building '{spec}' failed in {provided.provider}: {type(exc).__name__}: {exc}",
                               provided.info.fix) from exc

    try:
        input_shape = source.default_input_shape(model_name)
    except Exception as exc:
        raise BnnslimError(f"the input shape of '{spec}' from {provided.provider} is not a tuple of ints: {exc}",
                           provided.info.fix) from exc
    return ModelSource(path=Path(source.name), name=model_name, sha256=digest, input_shape=input_shape,
                       factory=factory, provider=provided.provider)


def _import_file(path: Path, code: bytes, digest: str) -> types.ModuleType:
    """Run ``code`` (the bytes of ``path``) as a fresh module; the file's folder is importable meanwhile."""
    module_name = f"bnnslim_user_model_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    if b"\x00" in code:
        raise BnnslimError(f"'{path}' is not Python source (it contains null bytes)",
                           "give the .py file that builds your model")
    try:
        compiled = compile(code, str(path), "exec", dont_inherit=True)
    except SyntaxError as exc:
        line = (exc.text or "").strip()
        raise BnnslimError(f"syntax error in {path.name} line {exc.lineno}: {exc.msg}: {line}",
                           "fix the model file") from exc
    except ValueError as exc:  # e.g. null bytes: not Python source
        raise BnnslimError(f"'{path}' is not Python source ({exc})",
                           "give the .py file that builds your model") from exc
    module = types.ModuleType(module_name)
    module.__file__ = str(path)
    sys.modules[module_name] = module  # as importlib does: dataclasses and pickling look the module up
    sys.path.insert(0, str(path.parent))
    try:
        exec(compiled, module.__dict__)
    except BaseException as exc:
        del sys.modules[module_name]
        if isinstance(exc, BnnslimError):
            raise
        if isinstance(exc, SystemExit):
            raise BnnslimError(f"importing {path.name} called sys.exit({exc.code!r})",
                               "guard the script part of the model file with `if __name__ == \"__main__\":`") from None
        if not isinstance(exc, Exception):
            raise
        raise BnnslimError(f"importing {path.name} failed: {_user_frame(exc, path)}", "fix the model file") from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _user_frame(exc: BaseException, path: Path) -> str:
    """``"Type: message (file.py line N: code)"`` for the deepest frame in the user's file."""
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == path:
            where = f" ({path.name} line {frame.lineno}: {(frame.line or '').strip()})"
    return f"{type(exc).__name__}: {exc}{where}"


def _find_model(module: types.ModuleType, path: Path, name: str | None,
                models_only: bool = False) -> tuple[str, Callable[..., nn.Module]]:
    if name is not None:
        if not hasattr(module, name):
            raise BnnslimError(f"{path.name} has no '{name}'",
                               f"candidates: {', '.join(_candidates(module, path, named=True)) or 'none'}")
        obj = getattr(module, name)
        if models_only and not (name == DEFAULT_FACTORY or isinstance(obj, nn.Module)
                                or (inspect.isclass(obj) and issubclass(obj, nn.Module))):
            raise BnnslimError(f"the name '{name}' that a file recorded picks a {type(obj).__name__} in {path.name}; "
                               f"a recorded name may pick only {DEFAULT_FACTORY}, a model class or a model instance",
                               f"name it yourself as {path.name}:{name} if that is the model you mean")
        return name, _as_factory(obj, name, path)
    if callable(getattr(module, DEFAULT_FACTORY, None)):
        return DEFAULT_FACTORY, getattr(module, DEFAULT_FACTORY)
    if isinstance(getattr(module, DEFAULT_INSTANCE, None), nn.Module):
        return DEFAULT_INSTANCE, _as_factory(getattr(module, DEFAULT_INSTANCE), DEFAULT_INSTANCE, path)
    classes = _candidates(module, path)
    if len(classes) == 1:
        return classes[0], getattr(module, classes[0])
    if not classes:
        raise BnnslimError(
            f"no model found in {path.name}",
            f"define {DEFAULT_FACTORY}() returning the model, or name it as {path.name}:NAME",
        )
    raise BnnslimError(
        f"several models in {path.name}: {', '.join(classes)}",
        f"choose one as {path.name}:NAME, or define {DEFAULT_FACTORY}()",
    )


def _builds_models(module: types.ModuleType, obj: Any) -> bool:
    """An ``nn.Module`` instance or subclass, or a function defined in ``module`` itself (not imported)."""
    if isinstance(obj, nn.Module):
        return True
    if inspect.isclass(obj):
        return issubclass(obj, nn.Module)
    return inspect.isfunction(obj) and obj.__module__ == module.__name__


def _candidates(module: types.ModuleType, path: Path, named: bool = False) -> list[str]:
    """nn.Module subclasses defined in the file itself that take no required arguments.

    ``named``: what ``FILE:NAME`` may name instead: every model class, function
    and model instance defined in the file.
    """
    names = []
    for attr, value in vars(module).items():
        if named:
            if attr.startswith("_"):
                continue
            defined_here = getattr(value, "__module__", None) == module.__name__
            if isinstance(value, nn.Module) or (defined_here and _builds_models(module, value)):
                names.append(attr)
        elif (inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__ == module.__name__
                and _no_required_args(value)):
            names.append(attr)
    return names


def _as_factory(obj: Any, name: str, path: Path) -> Callable[..., nn.Module]:
    if isinstance(obj, nn.Module):
        return lambda: copy.deepcopy(obj)
    if callable(obj):
        return obj
    raise BnnslimError(f"'{name}' in {path.name} is a {type(obj).__name__}, not a model or a function",
                       "name a function, a class or an nn.Module instance")


def _no_required_args(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params)


def _accepts(fn: Callable[..., Any], kwarg: str) -> bool:
    try:
        return kwarg in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())
