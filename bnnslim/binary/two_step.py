"""Two-step training: binary activations with real weights first, then both binary.

ReActNet (Liu et al., ECCV 2020, sec. 4.1) and Real-to-Binary (Martinez et al.,
ICLR 2020) train a binary network in two steps: step 1 keeps the weights
real-valued and binarizes only the activations (``y = W * sign(x)``), step 2
starts from step 1's weights and binarizes both (``y = alpha * sign(W) *
sign(x)``, the scheme as chosen). The jump from float to binary is then taken
in two smaller steps. ``bnnslim binarize --real-weight-epochs N`` runs step 1
for ``N`` epochs before its ``--epochs``; in your own training script::

    with real_weights(model):
        train(model, ...)        # step 1
    train(model, ...)            # step 2: the scheme as binarized
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from bnnslim.binary.layers import BinaryConv2d
from bnnslim.binary.ste import no_scale
from bnnslim.plugin_types import SchemeSpec


def _real(w: torch.Tensor) -> torch.Tensor:
    return w


def real_weight_scheme(scheme: SchemeSpec) -> SchemeSpec:
    """``scheme`` with real weights and no scale: only its activations are binary (step 1)."""
    return replace(scheme, name=f"{scheme.name}, real weights", binarize_weight=_real, scale=no_scale,
                   description=f"step 1 of two-step training: real weights, activations as {scheme.name}")


@contextmanager
def real_weights(model: nn.Module) -> Iterator[int]:
    """Within the block every ``BinaryConv2d`` of ``model`` uses real weights (step 1); restored on exit.

    Yields how many layers were switched. The latent weights are the real
    weights, so step 2 starts from exactly what step 1 learned.
    """
    layers = [m for m in model.modules() if isinstance(m, BinaryConv2d)]
    schemes = [m.scheme for m in layers]
    try:
        for m, scheme in zip(layers, schemes, strict=True):
            m.scheme = real_weight_scheme(scheme)
        yield len(layers)
    finally:
        for m, scheme in zip(layers, schemes, strict=True):
            m.scheme = scheme
