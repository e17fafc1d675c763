"""bnnslim: make binary neural networks small.

Binarize an ordinary PyTorch model, learn which filters to keep layer by layer
with the Main/Subsidiary method (Xu, Dong, Li, Su, CVPR 2019), slim the graph for
real and save it as safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnnslim._version import __version__

if TYPE_CHECKING:
    from torch import nn

    from bnnslim.trust import ModelArg


def load(path: str | Path, model: ModelArg = None, *, runtime: str = "torch",
         trust_source: bool = False) -> nn.Module:
    """Rebuild a model saved by ``bnnslim export`` (plain or packed), without pickle.

    Loading never runs code because the file names it. ``model`` is the model code
    you trust: ``"FILE[:NAME]"``, a plugin's ``"PREFIX:NAME"`` (e.g.
    ``"torchvision:resnet18"``), or an ``nn.Module`` / factory in memory; a ``.py``
    file must be the one exported (same sha256). Without ``model``, a plugin source
    recorded in the file is used, and so is a model file recorded by this account's
    bnnslim (signed at ``bnnslim binarize``); ``trust_source=True`` uses any other
    recorded file path. ``runtime="packed"`` runs the binary convs on bnnslim's
    XNOR-popcount runtime instead of torch's float emulation. Raises
    :class:`bnnslim.errors.BnnslimError` for a bad file. See :mod:`bnnslim.trust`.
    """
    from bnnslim.model_file import load as _load

    return _load(path, model, runtime=runtime, trust_source=trust_source)


#: The in-memory API (docs/api.md), imported on first use so that ``import bnnslim`` stays light.
_API: dict[str, str] = {
    "binarize": "bnnslim.api", "slim": "bnnslim.api", "save": "bnnslim.api", "dataset": "bnnslim.api",
    "fit": "bnnslim.train", "Teacher": "bnnslim.train", "Distillation": "bnnslim.train",
    "learn_masks": "bnnslim.prune.schedule", "PruneSchedule": "bnnslim.prune.schedule",
    "ScheduleConfig": "bnnslim.prune.schedule",
    "real_weights": "bnnslim.binary.two_step", "BnnslimError": "bnnslim.errors",
}

__all__ = ["__version__", "load", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'bnnslim' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
