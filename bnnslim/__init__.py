"""bnnslim: make binary neural networks small.

Binarize an ordinary PyTorch model, learn which filters to keep layer by layer
with the Main/Subsidiary method (Xu, Dong, Li, Su, CVPR 2019), slim the graph for
real and save it as safetensors.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def load(path: str | Path, model_file: str | Path | None = None, runtime: str = "torch") -> "nn.Module":
    """Rebuild a model saved by ``bnnslim export`` (plain or packed), without pickle.

    ``model_file`` overrides the model source recorded in the file; its content
    must be unchanged since export. ``runtime="packed"`` runs the binary convs on
    bnnslim's XNOR-popcount runtime instead of torch's float emulation. See
    :func:`bnnslim.model_file.load`.
    """
    from bnnslim.model_file import load as _load

    return _load(path, model_file, runtime)
