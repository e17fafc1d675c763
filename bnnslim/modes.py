"""A model's train/eval mode and its parameters' ``requires_grad``, set for a while and restored afterwards
(also when the body raises)."""

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


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Every parameter of ``model`` without gradients for the duration (the body may unfreeze some); the
    ``requires_grad`` flags and the train/eval mode are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
