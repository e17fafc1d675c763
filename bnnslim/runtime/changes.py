"""A counter of changes to packed layers, so that plans made from them (:mod:`bnnslim.runtime.segments`) know
when to be made again.

Every packed layer and packed sequence calls :func:`changed` from ``__setattr__``
(a new buffer, mode or child); a plan records :func:`generation` when it is made.
"""

from __future__ import annotations

_generation = 0


def changed() -> None:
    """A packed layer or a packed sequence changed: every plan is made again on its next call."""
    global _generation
    _generation += 1


def generation() -> int:
    """How many changes there have been in this process."""
    return _generation
