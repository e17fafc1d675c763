"""What model code bnnslim may run when it rebuilds a model that a file describes.

A model file from ``bnnslim export`` and a run directory's ``manifest.json``
record where the model's code is: a plugin's ``PREFIX:NAME`` (installed code,
e.g. ``torchvision:resnet18``) or the absolute path of a ``.py`` file, with a
sha256. A file is data, often a stranger's: bnnslim never imports code because
a file names it. The code used is, in this order:

1. what the caller names (``model=`` / ``--model``): ``FILE[:NAME]``,
   ``PREFIX:NAME``, or an ``nn.Module`` / factory already in memory;
2. a recorded plugin source (installed code);
3. a recorded ``.py`` file, when the record carries a valid **signature** made
   with this account's key: ``bnnslim binarize`` signs the model entry of every
   run it makes (so do ``bnnslim trust`` and files exported from such runs); a
   run directory or model file from elsewhere does not verify;
4. a recorded ``.py`` file when the caller opts in with ``trust_source=True``
   (``--trust-source``): only an absolute path, and a recorded name may then pick
   only a model, a model class or a function defined in that file.

Anything else is refused with a message that says how to opt in. The recorded
sha256 is mandatory and must match whenever a ``.py`` file is used, the
caller's or the recorded one; only ``.py`` source is ever imported, from the
very bytes that were hashed (see :func:`bnnslim.model_source.load_model_file`).

The key is 32 random bytes in ``$XDG_CONFIG_HOME/bnnslim/trust.key``
(``~/.config/bnnslim/trust.key``), created on first use, mode 0600; a key file
that other users can read or that another user owns is refused. Under torchrun
on several machines every machine needs the same key (a shared home).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bnnslim.errors import BnnslimError
from bnnslim.model_source import ModelSource, load_model_file, load_model_source, split_spec

#: what the caller may pass as ``model=``: a spec, or a model / factory already in memory
ModelArg = str | Path | nn.Module | Callable[..., nn.Module] | None

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: the source recorded by ``bnnslim.save`` for a model built in memory: only the caller's ``model=`` can rebuild it
IN_MEMORY = "<in-memory>"
_PLUGIN_SOURCE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_PLUGIN_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a plugin's model names (e.g. bnnslim:small-cnn)
_SIGNED_FIELDS = ("source", "name", "sha256", "num_classes", "in_channels")


@dataclass(frozen=True)
class RecordedModel:
    """A validated ``model`` entry of a manifest or a model file's header."""

    source: str  # absolute .py path, or a plugin source's prefix
    name: str
    sha256: str
    num_classes: int | None
    in_channels: int | None

    @property
    def in_memory(self) -> bool:
        """Saved by ``bnnslim.save`` from a model in memory: no code is recorded at all."""
        return self.source == IN_MEMORY

    @property
    def is_plugin(self) -> bool:
        """A plugin's model source (``torchvision``): never looked up as a file."""
        return bool(_PLUGIN_SOURCE.match(self.source)) and not self.source.endswith(".py")

    @property
    def spec(self) -> str:
        return f"{self.source}:{self.name}"

    def canonical(self) -> bytes:
        """The bytes a signature covers."""
        fields = {k: getattr(self, k) for k in _SIGNED_FIELDS}
        return b"bnnslim-model-entry\0" + json.dumps(fields, sort_keys=True).encode()


def recorded_model(entry: Any, where: str) -> RecordedModel:
    """Validate a recorded ``model`` entry; a clear error for a damaged or incomplete one."""
    fix = "the file is damaged or was not written by bnnslim: make it again"
    if not isinstance(entry, dict):
        raise BnnslimError(f"{where} has no valid model entry (found {type(entry).__name__})", fix)
    source, name, digest = entry.get("source"), entry.get("name"), entry.get("sha256")
    if not isinstance(source, str) or not source:
        raise BnnslimError(f"{where} records no model source", fix)
    plugin = isinstance(source, str) and bool(_PLUGIN_SOURCE.match(source)) and not source.endswith(".py")
    if not isinstance(name, str) or not (_PLUGIN_MODEL.match(name) if plugin else name.isidentifier()):
        what = "a model name" if plugin else "a Python identifier"
        raise BnnslimError(f"{where} records the model name {name!r}, which is not {what}", fix)
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise BnnslimError(f"{where} records no valid sha256 of its model source (found {digest!r}); bnnslim "
                           "requires it to check the model code", fix)
    counts = {}
    for key in ("num_classes", "in_channels"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 20):
            raise BnnslimError(f"{where} records {key} = {value!r}, not a positive count", fix)
        counts[key] = value
    return RecordedModel(source=source, name=name, sha256=digest, **counts)


# ------------------------------------------------------------------ signatures


def key_path() -> Path:
    """Where this account's signing key lives."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "bnnslim" / "trust.key"


def _read_key(create: bool) -> bytes | None:
    path = key_path()
    if not path.exists():
        if not create:
            return None
        _create_key(path)
    try:
        st = path.stat()
        if st.st_uid != os.geteuid():
            raise BnnslimError(f"bnnslim's key '{path}' belongs to another user",
                               "remove it (bnnslim makes a new one; re-sign your runs with `bnnslim trust`)")
        if st.st_mode & 0o077:
            raise BnnslimError(f"bnnslim's key '{path}' is readable by other users (mode {st.st_mode & 0o777:o})",
                               f"run `chmod 600 {path}`")
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BnnslimError(f"bnnslim's key '{path}' is unreadable ({exc})",
                           "remove it (bnnslim makes a new one; re-sign your runs with `bnnslim trust`)") from exc
    if len(key) < 32:
        raise BnnslimError(f"bnnslim's key '{path}' is damaged", "remove it; bnnslim makes a new one")
    return key


def _create_key(path: Path) -> None:
    """Make the key file atomically: a complete file appears under its name, or none does."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".trust.key.", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process made the key meanwhile: theirs is kept
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise BnnslimError(f"cannot create bnnslim's key '{path}': {exc.strerror or exc}",
                           "make $XDG_CONFIG_HOME (or ~/.config) writable, or set XDG_CONFIG_HOME") from exc


def sign(recorded: RecordedModel) -> str:
    """This account's signature of a model entry (creates the key on first use)."""
    key = _read_key(create=True)
    assert key is not None
    return hmac.new(key, recorded.canonical(), hashlib.sha256).hexdigest()


def verify(recorded: RecordedModel, signature: Any) -> bool:
    """Whether ``signature`` is this account's signature of ``recorded``."""
    if not isinstance(signature, str) or not signature:
        return False
    key = _read_key(create=False)
    if key is None:
        return False
    expected = hmac.new(key, recorded.canonical(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


# ------------------------------------------------------------------ choosing the code


def model_source_for(recorded: RecordedModel, where: str, *, model: ModelArg = None, trust_source: bool = False,
                     signature: Any = None, how_to_trust: str = "") -> ModelSource:
    """The model code to rebuild ``recorded`` with, by the rules of the module docstring.

    ``where`` names the file or run for messages; ``how_to_trust`` adds a way to
    opt in that fits the caller (e.g. ``bnnslim trust`` for a run directory).
    """
    if model is not None:
        return _callers_model(model, recorded)
    if recorded.in_memory:
        raise BnnslimError(f"{where} was saved from a model built in memory ({recorded.name}) and records no code",
                           "pass model= naming the code that builds the original architecture "
                           "(a function, a module, or FILE[:NAME])")
    if recorded.is_plugin:
        from bnnslim.model_source import load_plugin_model
        from bnnslim.plugins import find_model_source

        provided = find_model_source(recorded.source)
        if provided is None:
            raise BnnslimError(f"the model '{recorded.spec}' of {where} comes from a model source "
                               f"'{recorded.source}' that no installed plugin provides",
                               "install the plugin it was made with, or pass model= (--model) naming the model code")
        return load_plugin_model(provided, recorded.name, recorded.sha256)
    path = Path(recorded.source)
    if verify(recorded, signature):
        return load_model_file(path, recorded.name, recorded.sha256)
    if trust_source:
        if not path.is_absolute():
            raise BnnslimError(f"{where} records its model file as the relative path '{recorded.source}'; bnnslim "
                               "never resolves a recorded path against the current directory",
                               "pass model= (--model) with the path of the model file you trust")
        if not path.is_file():
            raise BnnslimError(f"the model file '{path}' that {where} records no longer exists",
                               "restore it at that path, or pass model= (--model) with where it is now")
        return load_model_file(path, recorded.name, recorded.sha256, models_only=True)
    extra = f", {how_to_trust}" if how_to_trust else ""
    raise BnnslimError(
        f"{where} names the model file '{recorded.source}' ({recorded.name}), and it was not made by this "
        "account's bnnslim (no valid signature): bnnslim does not run code because a file names it",
        f"if you trust that code, pass model='FILE[:NAME]' (--model FILE[:NAME]) naming it{extra}, "
        "or trust_source=True (--trust-source) to use the recorded path")


def _callers_model(model: ModelArg, recorded: RecordedModel) -> ModelSource:
    """The caller's ``model=``: a spec checked against the recorded sha256, or an object in memory."""
    if isinstance(model, nn.Module):
        instance = model
        return ModelSource(path=Path("<model given>"), name=type(model).__name__, sha256=recorded.sha256,
                           input_shape=None, factory=lambda: copy.deepcopy(instance))
    if callable(model) and not isinstance(model, (str, Path)):
        return ModelSource(path=Path("<model given>"), name=getattr(model, "__name__", type(model).__name__),
                           sha256=recorded.sha256, input_shape=None, factory=model)
    if not isinstance(model, (str, Path)):
        raise BnnslimError(f"model= is a {type(model).__name__}",
                           "give FILE[:NAME], PREFIX:NAME, an nn.Module or a function that returns one")
    spec = str(model)
    path, name = split_spec(spec)
    if Path(spec).is_file():
        path, name = Path(spec), None
    expected = None if recorded.in_memory else recorded.sha256  # an in-memory save has no file to compare with
    if path.is_file():
        # without NAME the recorded name is used, but only to pick a model defined in the file
        if recorded.in_memory:  # the recorded name is only a label: the file's own default model is meant
            return load_model_file(path, name)
        return load_model_file(path, name or recorded.name, expected, models_only=name is None)
    return load_model_source(spec, expected_sha256=expected)
