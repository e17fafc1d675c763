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
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import sys
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bnnslim.errors import BnnslimError

DEFAULT_FACTORY = "build_model"
DEFAULT_INSTANCE = "model"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and how to build it."""

    path: Path
    name: str  # the attribute that builds the model
    sha256: str  # of the file's bytes
    input_shape: tuple[int, ...] | None  # INPUT_SHAPE from the file, if any
    factory: Callable[..., nn.Module]

    @property
    def spec(self) -> str:
        """``FILE:NAME`` as the command line accepts it."""
        return f"{self.path}:{self.name}"

    def build(self, num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
        """Build a fresh model, passing ``num_classes``/``in_channels`` when the factory takes them."""
        offered = {"num_classes": num_classes, "in_channels": in_channels}
        kwargs = {k: v for k, v in offered.items() if v and _accepts(self.factory, k)}
        try:
            model = self.factory(**kwargs)
        except Exception as exc:
            raise BnnslimError(
                f"building the model with {self.name}({_kwargs_text(kwargs)}) failed: {_user_frame(exc, self.path)}",
                f"fix {self.path.name}",
            ) from exc
        if not isinstance(model, nn.Module):
            raise BnnslimError(f"{self.name} in {self.path.name} returned {type(model).__name__}, not an nn.Module",
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
    """Import ``FILE[:NAME]`` and find the model in it (rules in the module docstring)."""
    path, name = split_spec(spec)
    if not path.is_file():
        raise BnnslimError(f"model file '{path}' not found", "give the path of a .py file that builds your model")
    path = path.resolve()
    digest = file_sha256(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise BnnslimError(
            f"model file '{path}' changed since the run directory was made (sha256 differs)",
            "restore the file, or start a new run with --run DIR",
        )
    module = _import_file(path, digest)
    name, factory = _find_model(module, path, name)
    input_shape = getattr(module, "INPUT_SHAPE", None)
    if input_shape is not None:
        try:
            input_shape = tuple(int(d) for d in input_shape)
        except (TypeError, ValueError) as exc:
            raise BnnslimError(f"INPUT_SHAPE in {path.name} must be a tuple of ints like (3, 32, 32)",
                               "fix it or remove it") from exc
    return ModelSource(path=path, name=name, sha256=digest, input_shape=input_shape, factory=factory)


def _import_file(path: Path, digest: str) -> types.ModuleType:
    module_name = f"bnnslim_user_model_{digest[:12]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise BnnslimError(f"cannot import '{path}'", "give a Python source file ending in .py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        line = (exc.text or "").strip()
        raise BnnslimError(f"syntax error in {path.name} line {exc.lineno}: {exc.msg}: {line}",
                           "fix the model file") from exc
    except Exception as exc:
        raise BnnslimError(f"importing {path.name} failed: {_user_frame(exc, path)}", "fix the model file") from exc
    finally:
        sys.path.remove(str(path.parent))
    sys.modules[module_name] = module
    return module


def _user_frame(exc: BaseException, path: Path) -> str:
    """``"Type: message (file.py line N: code)"`` for the deepest frame in the user's file."""
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == path:
            where = f" ({path.name} line {frame.lineno}: {(frame.line or '').strip()})"
    return f"{type(exc).__name__}: {exc}{where}"


def _find_model(module: types.ModuleType, path: Path, name: str | None) -> tuple[str, Callable[..., nn.Module]]:
    if name is not None:
        if not hasattr(module, name):
            raise BnnslimError(f"{path.name} has no '{name}'", f"candidates: {', '.join(_candidates(module, path)) or 'none'}")
        return name, _as_factory(getattr(module, name), name, path)
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


def _candidates(module: types.ModuleType, path: Path) -> list[str]:
    """nn.Module subclasses defined in the file itself that take no required arguments."""
    names = []
    for attr, value in vars(module).items():
        if (inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__ == module.__name__
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
