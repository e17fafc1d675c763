"""The typed objects that plugins return from bnnslim's hooks.

Each hook in :mod:`bnnslim.hookspecs` returns an iterable of one of these
dataclasses. They are plain data with callables, so a plugin needs nothing from
bnnslim but this module to describe what it offers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports only for type checkers
    import torch
    from torch import nn
    from torch.utils.data import Dataset
    from torch_pruning.pruner.function import BasePruningFunc

    from bnnslim.prune.groups import PrunableGroup
    from bnnslim.prune.masking import MaskController


@dataclass(frozen=True)
class DatasetSplits:
    """The train and test splits of an image classification dataset.

    Items are ``(image_tensor[C,H,W] float, label int)`` pairs.
    """

    train: Dataset
    test: Dataset


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset that ``--data NAME`` selects.

    ``build(root)`` returns the splits; ``root`` is ``--data-root`` (``None`` when
    the user gave none). It must raise :class:`bnnslim.errors.BnnslimError` with a
    fix when the data is missing or in the wrong layout. ``num_classes == 0``
    means "found from the data": the built train split then has ``.classes``.

    ``build_at(root, (C, H, W))`` is optional, for images of any size (``folder``):
    the splits resized to that shape. bnnslim then runs the model at its own input
    shape (``--input-shape``, else the model's ``INPUT_SHAPE``, else
    ``input_shape``) instead of refusing a dataset whose images differ.
    """

    name: str
    description: str
    input_shape: tuple[int, int, int]
    num_classes: int
    build: Callable[[Path | None], DatasetSplits]
    needs_root: bool = False
    build_at: Callable[[Path | None, tuple[int, int, int]], DatasetSplits] | None = None

    def splits_for(self, root: Path | None, input_shape: tuple[int, ...] | None = None) -> DatasetSplits:
        """The splits a model run at ``input_shape`` trains on: resized by ``build_at`` when it exists."""
        if self.build_at is not None and input_shape is not None and tuple(input_shape) != self.input_shape:
            c, h, w = (int(d) for d in input_shape)
            return self.build_at(root, (c, h, w))
        return self.build(root)

    def shape_for(self, model_shape: tuple[int, ...] | None) -> tuple[int, ...]:
        """The input shape a run takes from this dataset: the model's own when the dataset can resize to it."""
        return tuple(model_shape) if (self.build_at is not None and model_shape) else self.input_shape


@dataclass(frozen=True)
class SchemeSpec:
    """A binarization scheme that ``--scheme NAME`` selects.

    ``binarize_input(x)`` maps activations to {-1, +1} (0 stays 0) with a
    straight-through gradient. ``binarize_weight(w)`` maps latent weights
    ``[out, in, kh, kw]`` to {-1, +1}. ``scale(w, kept)`` returns the per-filter
    scale ``[out, 1, 1, 1]`` or ``None`` for no scale; ``kept`` (0/1, broadcast to
    ``[out, in, 1, 1]``, or ``None`` for all) marks the input channels that are
    kept: the scale must depend on those only, so that physically removing the
    masked inputs leaves it unchanged (see :func:`bnnslim.binary.ste.mean_abs_scale`).
    """

    name: str
    description: str
    binarize_input: Callable[[torch.Tensor], torch.Tensor]
    binarize_weight: Callable[[torch.Tensor], torch.Tensor]
    scale: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None]


@dataclass
class SelectionContext:
    """What a selection strategy sees when it is asked about one group.

    ``model`` is the main network with the masks of the groups decided so far
    applied (later groups unmasked). A strategy that learns a mask installs it
    with ``masks.set_source(group.id, fn)``; the framework removes it afterwards.
    ``batches`` yields ``(x, y)`` training batches on ``device`` forever, in a
    seeded order; ``heldout`` is one fixed batch the training stream never yields.

    Distillation: ``teacher`` is the frozen teacher, the unpruned network or
    the float model that ``--teacher`` names (eval mode, no gradients; ``None``
    when distillation is off) and ``loss(logits, y, x)`` is
    the loss the schedule trains with: cross-entropy plus, with a teacher,
    ``weight * T^2 * KL`` between the teacher's softened outputs on ``x`` and
    ``logits`` (:func:`bnnslim.train.training_loss`). A strategy that learns
    should minimise :meth:`objective` rather than plain cross-entropy.
    """

    model: nn.Module
    group: PrunableGroup
    masks: MaskController
    suggested_keep: int  # the group's uniform share of the remaining budget
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    heldout: tuple[torch.Tensor, torch.Tensor]
    steps: int  # --select-steps
    lr: float  # --select-lr
    penalty: float  # --penalty (budget-aware sparsity weight)
    generator: torch.Generator
    device: torch.device
    teacher: nn.Module | None = None
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None

    def objective(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The schedule's training loss for ``logits`` of inputs ``x``: ``loss`` if set, else cross-entropy."""
        if self.loss is not None:
            return self.loss(logits, y, x)
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), y)


@dataclass
class Selection:
    """A strategy's answer for one group.

    ``scores`` has one value per channel of the group's root; higher means keep.
    ``keep`` is the count the strategy would like (``None``: the suggested share);
    the budget turns it into the nearest feasible count and the top-``k`` scores
    are kept. ``state`` holds tensors worth saving (e.g. learned selectors).
    """

    scores: torch.Tensor
    keep: int | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class StrategySpec:
    """A selection strategy that ``bnnslim prune --strategy NAME`` selects.

    ``select(ctx) -> Selection`` is called once per prunable group, bottom-up.
    """

    name: str
    description: str
    select: Callable[[SelectionContext], Selection]


@dataclass(frozen=True)
class ModelSourceSpec:
    """A model zoo that ``bnnslim binarize PREFIX:NAME`` reads from (``name`` is the prefix).

    ``build(model_name, num_classes, in_channels)`` returns a fresh ``nn.Module``
    (random weights, or whatever the source considers its default); ``num_classes``
    and ``in_channels`` come from the dataset and are ``None`` when unknown, in
    which case the source uses its own default. It raises
    :class:`bnnslim.errors.BnnslimError` for a name it does not know.
    ``list_models()`` (optional) returns the names it offers, so that a typo gets a
    list of candidates. ``input_shape`` is the default ``(C, H, W)`` of one input,
    for every model of the source or per model name (a callable returning ``None``
    when unknown). ``version`` identifies what ``build`` makes (e.g. the zoo's
    release); it is part of the identity a run directory records, with the
    plugin's distribution and version.
    """

    name: str
    description: str
    build: Callable[[str, int | None, int | None], nn.Module]
    list_models: Callable[[], Iterable[str]] | None = None
    input_shape: tuple[int, ...] | Callable[[str], tuple[int, ...] | None] | None = None
    version: str = ""

    def default_input_shape(self, model_name: str) -> tuple[int, ...] | None:
        """The input shape of ``model_name`` without the batch dimension, if the source knows it."""
        shape = self.input_shape(model_name) if callable(self.input_shape) else self.input_shape
        return tuple(int(d) for d in shape) if shape is not None else None


@dataclass(frozen=True)
class PrunerSpec:
    """How torch-pruning slices a layer type it does not know.

    ``pruner`` is an instance of ``torch_pruning.pruner.BasePruningFunc`` (e.g. a
    subclass of ``torch_pruning.pruner.function.ConvPruner``); it is passed to
    torch-pruning's ``build_dependency(..., customized_pruners={layer_type: pruner})``
    whenever bnnslim traces a model. Keys are looked up by *exact* class, so each
    subclass needs its own spec.
    """

    layer_type: type
    pruner: BasePruningFunc

    @property
    def name(self) -> str:
        """The layer type's qualified name (what ``bnnslim plugins`` shows)."""
        kind = self.layer_type
        return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', repr(kind))}"


@dataclass(frozen=True)
class CommandSpec:
    """An extra ``bnnslim NAME`` command.

    ``callback`` is a Typer command function (parameters annotated with
    ``typer.Argument``/``typer.Option``); it is added to the app when ``bnnslim``
    starts, so import heavy modules inside it, not at the plugin's top level.
    """

    name: str
    help: str
    callback: Callable[..., Any]
