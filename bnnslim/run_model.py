"""Rebuild the binarized model that a run directory describes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnnslim.binary.convert import apply_binarization
from bnnslim.errors import BnnslimError
from bnnslim.model_source import ModelSource, file_sha256
from bnnslim.plugins import get_scheme, recorded_plugin
from bnnslim.rundir import RunDir, load_state, load_tensors
from bnnslim.runlock import run_lock
from bnnslim.trust import ModelArg, RecordedModel, model_source_for, recorded_model, sign

#: the most values one input may have (3x8192x8192 is 2**27.6): a larger recorded shape is damage
MAX_INPUT_ELEMENTS = 1 << 28


@dataclass
class RunModel:
    """A run's binary model with what describes it."""

    model: nn.Module
    manifest: dict[str, Any]
    source: ModelSource

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input_shape"])

    def example(self, batch: int = 2) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, *self.input_shape, generator=g)


def build_binary_model(source: ModelSource, manifest: dict[str, Any]) -> nn.Module:
    """The model file's model with the manifest's layers binarized (fresh weights)."""
    info = manifest["model"]
    model = source.build(num_classes=info.get("num_classes"), in_channels=info.get("in_channels"))
    modules = dict(model.named_modules())
    for name in manifest["layers"]["binary"]:
        if not isinstance(modules.get(name), nn.Conv2d):
            raise BnnslimError(f"the run's manifest binarizes layer '{name}', which {source.where} has no Conv2d for",
                               "the manifest does not belong to this model: start a new run with --run DIR")
    return apply_binarization(model, manifest["layers"]["binary"],
                              get_scheme(manifest["scheme"], recorded_plugin(manifest, "scheme")))


def check_manifest(manifest: dict[str, Any], run: RunDir) -> None:
    """The sections that rebuilding the run's model reads are there and well-formed."""
    fix = "the manifest is damaged: restore it, or start a new run with --run DIR"
    where = f"'{run.manifest_path}'"
    layers = manifest.get("layers")
    if not isinstance(layers, dict) or not isinstance(layers.get("binary"), list) \
            or not all(isinstance(n, str) for n in layers["binary"]):
        raise BnnslimError(f"{where} has no valid list of binary layers (layers.binary)", fix)
    if not isinstance(manifest.get("scheme"), str):
        raise BnnslimError(f"{where} names no binarization scheme", fix)
    shape = manifest.get("input_shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 16 for d in shape) \
            or math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise BnnslimError(f"{where} records the input shape {shape!r}, not a list of positive sizes like "
                           "[3, 32, 32]", fix)


def load_run_source(run: RunDir, manifest: dict[str, Any], model: ModelArg = None,
                    trust_source: bool = False) -> ModelSource:
    """The model code for the run, by :mod:`bnnslim.trust`'s rules.

    A model file is recorded with its absolute path, a plugin's model with its
    source's prefix (``torchvision``). The recorded file is used without
    ``model``/``trust_source`` only when this account's bnnslim signed the entry
    (``bnnslim binarize`` or ``bnnslim trust`` made it).
    """
    where = f"run '{run.path}'"
    recorded = recorded_model(manifest.get("model"), where)
    if model is None and not recorded.is_plugin and not Path(recorded.source).is_file():
        raise BnnslimError(f"the run's model file '{recorded.source}' no longer exists",
                           "restore it at that path, or start a new run")
    return model_source_for(recorded, where, model=model, trust_source=trust_source,
                            signature=manifest.get("model_signature"),
                            how_to_trust=f"or run `bnnslim trust --run {run.path}` if you made this run")


def load_run_model(run: RunDir, weights: Path | None = None, model: ModelArg = None,
                   trust_source: bool = False) -> RunModel:
    """The binarized model of ``run`` with its latent weights (``binary.safetensors`` by default)."""
    manifest = run.read_manifest()
    check_manifest(manifest, run)
    source = load_run_source(run, manifest, model, trust_source)
    built = build_binary_model(source, manifest)
    path = weights or run.binary_weights
    if weights is None:
        run.check_weights(path, manifest.get("binary_sha256"))
    load_state(built, load_tensors(path), path)
    return RunModel(model=built, manifest=manifest, source=source)


def trust_run(run: RunDir) -> RecordedModel:
    """Sign ``run``'s recorded model file with this account's key, after checking its sha256 (``bnnslim trust``).

    Nothing is imported. Afterwards commands on the run use the file without ``--model``.
    """
    with run_lock(run.path, "trust"):
        manifest = run.read_manifest()
        recorded = recorded_model(manifest.get("model"), f"run '{run.path}'")
        if not recorded.is_plugin:
            path = Path(recorded.source)
            if not path.is_absolute() or path.suffix != ".py":
                raise BnnslimError(f"run '{run.path}' records the model file '{recorded.source}', not an absolute "
                                   ".py path", "start a new run with `bnnslim binarize`")
            if not path.is_file():
                raise BnnslimError(f"the run's model file '{path}' no longer exists", "restore it at that path")
            if file_sha256(path) != recorded.sha256:
                raise BnnslimError(f"model file '{path}' changed since the run directory was made (sha256 differs)",
                                   "restore the file, or start a new run with --run DIR")
        manifest["model_signature"] = sign(recorded)
        run.store_manifest(manifest)
    return recorded
