"""The stages of bnnslim as functions on in-memory models.

``bnnslim.binarize``, ``bnnslim.slim``, ``bnnslim.save`` and ``bnnslim.dataset`` live here; training
(``bnnslim.fit``), mask learning (``bnnslim.learn_masks`` and the step-wise
``bnnslim.PruneSchedule``) and loading (``bnnslim.load``) live with their
algorithms and are re-exported by the package. Nothing here touches a run
directory, prints, or reads a dataset: the caller brings the model, the example
inputs and the data (see ``docs/api.md``). The ``bnnslim`` command line runs the
same algorithms over a run directory (:mod:`bnnslim.stages`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from bnnslim.binary.convert import BinarizePlan, apply_binarization, binary_convs, plan_binarization
from bnnslim.errors import BnnslimError
from bnnslim.graph import build_graph
from bnnslim.modes import evaluating
from bnnslim.plugin_types import DatasetSplits, SchemeSpec


def binarize(model: nn.Module, example_inputs: torch.Tensor, scheme: str | SchemeSpec = "xnor", *,
             real: Sequence[str] = (), binary: Sequence[str] = (), keep_first_last_real: bool = True,
             inplace: bool = False) -> tuple[nn.Module, BinarizePlan]:
    """Swap the model's convs for binary ones; returns ``(binary model, plan)``.

    Every ``nn.Conv2d`` becomes a :class:`bnnslim.binary.layers.BinaryConv2d`
    (sign weights with the scheme's per-filter scale, sign activations,
    straight-through gradients) except the first conv and the last conv/linear
    that ``example_inputs`` (one batch) runs through, which stay real unless
    ``keep_first_last_real=False``; ``real``/``binary`` are shell-style name
    patterns that force a layer either way. ``scheme`` is a scheme name
    (``xnor``, ``sign``, ``bireal``, or a plugin's) or a ``SchemeSpec``. The
    latent weights start from the model's weights. Raises
    :class:`bnnslim.errors.BnnslimError` when torch-pruning cannot trace the
    binary model (it could then not be pruned). ``plan.real`` says why each real
    conv stayed real.
    """
    from bnnslim.plugins import get_scheme

    spec = scheme if isinstance(scheme, SchemeSpec) else get_scheme(scheme)
    target = model if inplace else copy.deepcopy(model)
    plan = plan_binarization(target, example_inputs, real=real, binary=binary,
                             keep_first_last_real=keep_first_last_real)
    apply_binarization(target, plan.binary, spec)
    build_graph(target, example_inputs)
    return target, plan


def slim(model: nn.Module, masks: Mapping[str, torch.Tensor], example_inputs: torch.Tensor, *,
         exclude: Sequence[str] = ()) -> nn.Module:
    """A copy of ``model`` without the filters whose mask is 0, nor anything coupled to them.

    ``masks`` maps a prunable group (its root conv's name) to a 0/1 vector over
    the root's channels, as :func:`bnnslim.learn_masks` returns them; the
    filters go through torch-pruning's dependency graph (BatchNorm, consumers'
    input channels, residual partners, concat offsets). The result is checked
    on ``example_inputs``: it must compute what the masked model computes (each
    removed channel masked at all its consumers, which is what mask learning
    trained); otherwise :class:`bnnslim.errors.BnnslimError` names the first
    layer that diverges. ``model`` itself is left as it was.
    """
    from bnnslim.prune.groups import find_groups
    from bnnslim.prune.slim import checked_slim

    with evaluating(model):
        groups = find_groups(model, build_graph(model, example_inputs), example_inputs, exclude=exclude).groups
    return checked_slim(model, groups, masks, example_inputs)[0]


def save(model: nn.Module, path: str | Path, *, input_shape: Sequence[int], packed: bool = False,
         metrics: Mapping[str, object] | None = None) -> Path:
    """Write a binary ``model`` (slim or not) as a bnnslim model file, atomically; returns the path.

    ``input_shape`` is one input without the batch dimension, e.g. ``(1, 28, 28)``.
    ``packed=True`` stores binary conv weights as sign bits (8 per byte) plus the
    per-filter scale; otherwise the latent weights as they are. The file holds
    tensors and a JSON header (layer shapes, binary layers, scheme), never code:
    reload it with ``bnnslim.load(path, model=...)`` naming the code that builds
    the original architecture (a function, a module, or ``FILE[:NAME]``).
    """
    from bnnslim.model_file import layer_shapes, write_model_file
    from bnnslim.trust import IN_MEMORY

    convs = binary_convs(model)
    if not convs:
        raise BnnslimError("the model has no binary conv", "binarize it first: bnnslim.binarize(model, example_inputs)")
    schemes = {m.scheme.name for m in convs.values()}
    if len(schemes) != 1:
        raise BnnslimError(f"the model mixes binary schemes ({', '.join(sorted(schemes))})",
                           "binarize every conv with one scheme")
    shape = [int(d) for d in input_shape]
    if not shape or any(d <= 0 for d in shape):
        raise BnnslimError(f"input_shape {tuple(input_shape)} is not a list of positive sizes",
                           "give one input's shape without the batch dimension, e.g. (1, 28, 28)")
    architecture = json.dumps(layer_shapes(model), sort_keys=True).encode()
    label = type(model).__name__ if type(model).__name__.isidentifier() else "model"
    manifest = {
        "model": {"source": IN_MEMORY, "name": label, "sha256": hashlib.sha256(architecture).hexdigest(),
                  "num_classes": None, "in_channels": None},
        "scheme": schemes.pop(), "layers": {"binary": list(convs)}, "input_shape": shape,
    }
    target = Path(path)
    write_model_file(target, model, manifest, "packed" if packed else "plain", dict(metrics or {}))
    return target


def dataset(name: str, root: str | Path | None = None,
            input_shape: tuple[int, int, int] | None = None) -> DatasetSplits:
    """The train and test splits of a dataset bnnslim knows (``--data NAME``): built-in or a plugin's.

    Items are ``(image [C, H, W] float tensor, label)``; ``root`` is where the
    files are (``--data-root``), for datasets that need one. ``input_shape``
    resizes datasets of images of any size (``folder``) to what the model takes;
    other datasets ignore it.
    """
    from bnnslim.plugins import get_dataset

    return get_dataset(name).splits_for(Path(root) if root is not None else None, input_shape)
