"""The run directory that bnnslim's commands share (default ``./bnnslim-run``).

Layout::

    manifest.json          what the run is: model source and hash, scheme, binary
                           layers, input shape, dataset, metrics per stage
    binary.safetensors     latent weights of the binarized (main) network
    checkpoints/           state to resume an interrupted stage

Every file is written atomically. Weights are safetensors only (no pickle).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnnslim._atomic import save_tensors, write_json
from bnnslim._version import __version__
from bnnslim.errors import BnnslimError

DEFAULT_RUN = Path("bnnslim-run")
MANIFEST_FORMAT = "bnnslim-run"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory, and reading/writing its manifest."""

    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def binary_weights(self) -> Path:
        return self.path / "binary.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        """The manifest; a clear error when there is none or it is not bnnslim's."""
        if not self.manifest_path.is_file():
            raise BnnslimError(f"no bnnslim run in '{self.path}' (no manifest.json)",
                               "run `bnnslim binarize MODEL.py` first, or point --run at the run directory")
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError and UnicodeDecodeError
            raise BnnslimError(f"'{self.manifest_path}' is not valid JSON: {exc}",
                               "restore it or start a new run with --run DIR") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise BnnslimError(f"'{self.manifest_path}' is not a bnnslim manifest",
                               "point --run at a directory made by `bnnslim binarize`")
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write a new run's manifest, its model entry signed with this account's key (:mod:`bnnslim.trust`).

        Only for a manifest whose model entry comes from what the user named
        (``bnnslim binarize``); :meth:`update_manifest` keeps the signature it read.
        """
        manifest = dict(manifest)
        manifest.pop("model_signature", None)
        if "model" in manifest:
            from bnnslim.trust import recorded_model, sign

            manifest["model_signature"] = sign(recorded_model(manifest["model"], f"run '{self.path}'"))
        manifest.pop("binary_sha256", None)
        if self.binary_weights.is_file():
            manifest["binary_sha256"] = file_digest(self.binary_weights)
        self.store_manifest(manifest)

    def store_manifest(self, manifest: dict[str, Any]) -> None:
        """Write ``manifest`` as it is (its signature, if any, unchanged)."""
        manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, **manifest,
                    "bnnslim_version": __version__}
        write_json(self.manifest_path, manifest)

    def update_manifest(self, **sections: Any) -> dict[str, Any]:
        """Replace top-level sections of the manifest and write it back (the model entry's signature unchanged).

        A section that names a ``weights`` file in the run gets that file's
        ``weights_sha256``, so that later stages can tell it belongs to this manifest.
        """
        manifest = self.read_manifest()
        if "model" in sections or "model_signature" in sections:
            raise ValueError("update_manifest does not change the model entry")
        for section in sections.values():
            if isinstance(section, dict) and isinstance(section.get("weights"), str) \
                    and (self.path / section["weights"]).is_file():
                section["weights_sha256"] = file_digest(self.path / section["weights"])
        manifest.update(sections)
        self.store_manifest(manifest)
        return manifest

    def check_weights(self, path: Path, recorded: Any) -> None:
        """``path`` is the weights file the manifest recorded (same sha256), when the manifest recorded one."""
        if not isinstance(recorded, str) or not Path(path).is_file():
            return
        if file_digest(Path(path)) != recorded:
            raise BnnslimError(
                f"'{path}' does not belong to run '{self.path}': its sha256 differs from the one recorded in the "
                "manifest when it was written (another command replaced it, or it was copied in)",
                "rerun the stage that writes it (`bnnslim binarize` or `bnnslim prune`), or restore the file")


def file_digest(path: Path) -> str:
    """The sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_weights(path: Path, model: nn.Module, kind: str, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Save a model's state dict (plus ``extra`` tensors) as safetensors, atomically."""
    tensors = dict(model.state_dict())
    if extra:
        tensors.update(extra)
    save_tensors(path, tensors, metadata={"format": "bnnslim-weights", "kind": kind, "bnnslim_version": __version__})


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a clear error if it is missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise BnnslimError(f"weights file '{path}' not found", "check the path or rerun the stage that writes it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BnnslimError(f"'{path}' is not a readable safetensors file ({exc})",
                           "the file is damaged or truncated: rerun the stage that writes it") from exc


def read_checkpoint(path: Path, required: Sequence[str] = ()) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a checkpoint; a clear error when it is damaged or lacks ``required`` metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BnnslimError(f"checkpoint '{path}' is damaged ({exc})",
                           "it cannot be resumed: run the command again without --resume") from exc
    missing = [k for k in required if k not in meta]
    if missing:
        raise BnnslimError(f"checkpoint '{path}' lacks {', '.join(missing)}",
                           "it cannot be resumed: run the command again without --resume")
    return meta, tensors


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], origin: Path) -> None:
    """Load ``tensors`` into ``model`` strictly, with a clear error on a mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    wrong = [k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        detail = (f"missing {missing[:3]}" if missing else
                  f"shape of {wrong[0]} is {tuple(tensors[wrong[0]].shape)}, "
                  f"the model has {tuple(own[wrong[0]].shape)}")
        raise BnnslimError(f"weights in '{origin}' do not fit the model: {detail}",
                           "use weights saved from the same model (and the same run)")
    load_with_metadata(model, {k: tensors[k] for k in own})


def load_with_metadata(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(tensors, strict=True)`` with the model's own state-dict metadata attached.

    Safetensors keeps no ``_metadata`` (the per-module ``version`` numbers), and
    some layers need it to read their state (torchvision's MNASNet refuses a state
    without a version); the freshly built model's own versions are the right ones.
    """
    ordered = OrderedDict(tensors)
    ordered._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(ordered, strict=True)
