"""Rebuild the binarized model that a run directory describes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnnslim.binary.convert import apply_binarization
from bnnslim.errors import BnnslimError
from bnnslim.model_source import ModelSource, load_model_source
from bnnslim.plugins import get_scheme
from bnnslim.rundir import RunDir, load_state, load_tensors


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
    return apply_binarization(model, manifest["layers"]["binary"], get_scheme(manifest["scheme"]))


def load_run_source(info: dict[str, Any]) -> ModelSource:
    """The model source a manifest's ``model`` entry records: a model file, or a plugin's ``PREFIX:NAME``.

    A model file is recorded with its absolute path, a plugin's model with its
    source's prefix (``torchvision``); ``f"{source}:{name}"`` loads either.
    """
    source_path = Path(info["source"])
    if not source_path.is_file():
        if source_path.is_absolute():
            raise BnnslimError(f"the run's model file '{source_path}' no longer exists",
                               "restore it at that path, or start a new run")
        from bnnslim.plugins import find_model_source

        if find_model_source(info["source"]) is None:
            raise BnnslimError(f"the run's model '{info['source']}:{info['name']}' comes from a model source "
                               f"'{info['source']}' that no installed plugin provides",
                               "install the plugin the run was made with, or start a new run")
    return load_model_source(f"{info['source']}:{info['name']}", expected_sha256=info["sha256"])


def load_run_model(run: RunDir, weights: Path | None = None) -> RunModel:
    """The binarized model of ``run`` with its latent weights (``binary.safetensors`` by default)."""
    manifest = run.read_manifest()
    source = load_run_source(manifest["model"])
    model = build_binary_model(source, manifest)
    path = weights or run.binary_weights
    load_state(model, load_tensors(path), path)
    return RunModel(model=model, manifest=manifest, source=source)
