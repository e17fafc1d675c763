"""The model's train/eval mode, set for a while and restored afterwards (also when the body raises)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (BatchNorm uses its running statistics) for the duration; its mode restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def eval_outputs(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)`` in eval mode without gradients, the model's mode restored."""
    with evaluating(model), torch.no_grad():
        return model(x)
