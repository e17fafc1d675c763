"""A counter of changes to packed layers, so that plans made from them (:mod:`bnnslim.runtime.segments`) know
when to be made again.

Every packed layer and packed sequence is a :class:`ChangeTracked`: it calls :func:`changed` when an attribute is
assigned (a new buffer, mode or child) and after a conversion (``.to()``, ``.half()``: torch's ``_apply`` puts
new tensors into the parameter and buffer dicts without ``__setattr__``); a plan records :func:`generation` when
it is made.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_generation = 0


def changed() -> None:
    """A packed layer or a packed sequence changed: every plan is made again on its next call."""
    global _generation
    _generation += 1


def generation() -> int:
    """How many changes there have been in this process."""
    return _generation


class ChangeTracked(nn.Module):
    """A runtime module whose tensors or settings a plan may hold (a kernel object, a bound op): every attribute
    assignment and every conversion of its tensors counts as a change (:func:`changed`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        changed()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        out = super()._apply(fn, *args, **kwargs)
        changed()
        return out
