"""Optimizer and RNG state as safetensors tensors plus JSON (no pickle).

``torch.save(optimizer.state_dict())`` pickles; checkpoints here store the
state's tensors under ``optim.<param>.<key>`` and everything else as JSON.
"""

from __future__ import annotations

import json
from typing import Any

import torch

PREFIX = "optim."


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON string."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{PREFIX}{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: str) -> None:
    """Inverse of :func:`optimizer_state`."""
    info = json.loads(meta)
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(PREFIX):
            pid, key = name[len(PREFIX):].split(".", 1)
            state.setdefault(int(pid), {})[key] = value
    for pid, scalars in info["scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    groups = info["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, torch.Tensor]:
    return {"rng.torch": torch.get_rng_state()}


def load_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
