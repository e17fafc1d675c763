"""Tracing a model's channel dependencies with torch-pruning.

torch-pruning's ``DependencyGraph`` records which layers' channels are coupled
(a conv and its BatchNorm, the next layer's inputs, residual adds, concats,
flatten -> linear). bnnslim builds one graph per model and uses it to find
prunable groups and to slim. This module turns torch-pruning's silent failure
modes into errors (see ``shared/notes/torch-pruning.md`` in the project notes).
"""

from __future__ import annotations

import warnings

import torch
import torch_pruning as tp
from torch import nn

from bnnslim.errors import BnnslimError


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model`` on ``example`` (a batch) and return its dependency graph.

    Raises when the model cannot be traced, or when a module owns a parameter that
    torch-pruning does not know how to slice (it would slice it on a wrong
    dimension and break the model later). The model's train/eval mode is kept.
    """
    was_training = model.training
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # verbose=True: torch-pruning only reports unwrapped parameters through this warning
            # (and unknown ops); every warning is caught here, none reaches the user.
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=True)
    except BnnslimError:
        raise
    except Exception as exc:
        raise BnnslimError(
            f"torch-pruning could not trace the model on an input of shape {tuple(example.shape)}: "
            f"{type(exc).__name__}: {exc}",
            "check that the model runs on that input (set --input-shape or INPUT_SHAPE in the model file)",
        ) from exc
    finally:
        model.train(was_training)
    for w in caught:
        text = str(w.message)
        if text.startswith("Unwrapped parameters detected"):
            names = text.split(":", 1)[1].split("\n", 1)[0].strip()
            raise BnnslimError(
                f"the model has parameters outside standard layers that torch-pruning cannot slice: {names}",
                "wrap them in a standard layer, or keep that layer out of pruning",
            )
    return graph
