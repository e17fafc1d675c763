"""What a plugin author needs to test a strategy, dataset, scheme or model source in-process.

No CLI subprocess, no run directory, no download: a tiny binary model, a
selection context exactly as ``bnnslim prune`` builds it, and a plugin manager
with only bnnslim's built-ins plus the plugins under test.

>>> from bnnslim.testing import plugins_registered, selection_context
>>> with plugins_registered(my_plugin_module):
...     ctx = selection_context()
...     selection = get_strategy("mine").select(ctx)
...     assert selection.scores.shape == (ctx.group.size,)

See ``docs/plugins.md`` for every field of the context and the specs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from bnnslim.plugin_types import SelectionContext

#: One input of :func:`tiny_binary_model` (a 1-channel 28x28 image).
INPUT_SHAPE = (1, 28, 28)


def tiny_binary_model(num_classes: int = 10, seed: int = 0, scheme: str = "xnor") -> nn.Module:
    """The half-width small CNN of ``bnnslim.zoo.small_cnn``, binarized (three binary convs, three groups)."""
    from bnnslim.api import binarize
    from bnnslim.zoo import small_cnn

    torch.manual_seed(seed)
    model, _ = binarize(small_cnn.tiny(num_classes=num_classes), example_inputs(seed=seed), scheme)
    return model


def example_inputs(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded batch of :data:`INPUT_SHAPE` inputs."""
    return torch.randn(batch, *INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


def random_batches(num_classes: int = 10, batch: int = 16,
                   seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded ``(x, y)`` batches forever, shaped like :data:`INPUT_SHAPE` images with labels."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield (torch.randn(batch, *INPUT_SHAPE, generator=generator),
               torch.randint(0, num_classes, (batch,), generator=generator))


def selection_context(group: int = 0, *, model: nn.Module | None = None, keep: float = 0.5, steps: int = 5,
                      teacher: bool = True, seed: int = 0) -> SelectionContext:
    """The context a strategy gets for prunable group ``group`` of ``model`` (default: :func:`tiny_binary_model`).

    Built by the real schedule (``bnnslim.prune.schedule.PruneSchedule``), with
    the groups before ``group`` decided by the ``random`` strategy, the batches
    from :func:`random_batches`, and, with ``teacher=True``, a frozen copy of the
    unpruned model as teacher (``ctx.loss`` then includes distillation). The
    masks of earlier groups stay installed on ``ctx.model`` while you use the
    context.
    """
    from bnnslim.prune.schedule import PruneSchedule, ScheduleConfig

    model = model if model is not None else tiny_binary_model(seed=seed)
    config = ScheduleConfig(keep=keep, strategy="random", select_steps=steps, retrain_steps=0, finetune_steps=0,
                            distill=1.0 if teacher else 0.0, seed=seed)
    schedule = PruneSchedule(model, example_inputs(seed=seed), config, teacher="copy" if teacher else None)
    batches = random_batches(seed=seed)
    for _ in range(group):
        schedule.select(batches)
        schedule.retrain(batches)
    target = schedule.next_group()
    if target is None:
        raise IndexError(f"the model has {len(schedule.groups)} prunable groups, not {group + 1}")
    return schedule.context(batches, target, suggested=max(1, round(keep * target.size)))


@contextlib.contextmanager
def plugins_registered(*plugins: object) -> Iterator[None]:
    """A fresh plugin manager with bnnslim's built-ins and ``plugins`` (modules or objects with hook functions).

    Installed third-party plugins stay out; the previous manager is restored afterwards.
    """
    from bnnslim import plugins as manager

    key = manager.DISABLE_EXTERNAL_ENV
    before = os.environ.get(key)
    os.environ[key] = "1"
    manager.reset_plugin_manager()
    try:
        pm = manager.get_plugin_manager()
        for i, plugin in enumerate(plugins):
            pm.register(plugin, name=f"under-test-{i}-{getattr(plugin, '__name__', type(plugin).__name__)}")
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
        manager.reset_plugin_manager()
