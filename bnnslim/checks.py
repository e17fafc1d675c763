"""Checks that commands run before they write anything (the commands call them at their start)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnnslim.errors import BnnslimError


def refuse_replacing_work(run_path: Path, overwrite: bool, resume: bool) -> None:
    """``bnnslim binarize`` must not silently replace a trained or pruned run, even of the same model.

    A run directory whose manifest records training, pruning or an export holds
    work that a new ``binarize`` would discard; it is replaced only with
    ``--overwrite`` (``--resume`` continues it instead).
    """
    from bnnslim.rundir import RunDir

    run = RunDir(Path(run_path))
    if overwrite or resume or not run.exists():
        return
    manifest = run.read_manifest()
    held = []
    if isinstance(manifest.get("binarize"), dict) and manifest["binarize"].get("trained"):
        held.append("a trained binary network")
    if manifest.get("prune"):
        held.append("a pruned network")
    if any((run.path / name).is_file() for name in ("model.safetensors", "model.bnn.safetensors")):
        held.append("exported models")
    if held:
        raise BnnslimError(f"run directory '{run.path}' already holds {', '.join(held)}; binarize would replace them",
                           "use --run DIR for a new run, --resume to continue this one, or --overwrite to replace it")


def check_model_output(output: Any, input_shape: tuple[int, ...], where: str, batch: int = 2) -> None:
    """The model's forward returns one tensor of logits ``[batch, classes]``: bnnslim trains and prunes on that.

    A tuple, list or dict (auxiliary heads, named outputs) is refused before
    anything is written, with the fix: a wrapper whose forward returns the logits.
    """
    import torch

    shape = "x".join(str(d) for d in input_shape)
    wrap = "wrap the model in an nn.Module whose forward returns the logits tensor only"
    if isinstance(output, dict):
        keys = ", ".join(repr(k) for k in list(output)[:5])
        raise BnnslimError(f"the model from {where} returns a dict ({keys}) for a {shape} input; bnnslim needs one "
                           "tensor of logits [batch, classes]", f"{wrap}, e.g. `return self.net(x)[\"logits\"]`")
    if isinstance(output, (tuple, list)):
        raise BnnslimError(f"the model from {where} returns a {type(output).__name__} of {len(output)} outputs for "
                           f"a {shape} input; bnnslim needs one tensor of logits [batch, classes]",
                           f"{wrap}, e.g. `return self.net(x)[0]`")
    if not isinstance(output, torch.Tensor):
        raise BnnslimError(f"the model from {where} returns a {type(output).__name__}, not a tensor of logits",
                           "return a tensor [batch, classes] from forward")
    if output.dim() != 2 or output.shape[0] != batch or not output.is_floating_point():
        raise BnnslimError(f"the model from {where} returns a {output.dtype} tensor of shape {tuple(output.shape)} "
                           f"for {batch} inputs of {shape}; bnnslim needs logits [batch, classes]",
                           "flatten and classify at the end of forward (e.g. nn.Flatten then nn.Linear)")


def check_dataset_sample(train: Any, input_shape: tuple[int, ...], dataset: str) -> None:
    """The dataset's samples have the shape the model will be run with (checked before anything is written)."""
    import torch

    try:
        sample = train[0]
    except Exception as exc:  # a dataset that cannot give one sample cannot train either; name it
        raise BnnslimError(f"dataset '{dataset}' cannot give its first training sample: "
                           f"{type(exc).__name__}: {exc}", "check the dataset files (--data-root)") from exc
    x = sample[0] if isinstance(sample, (tuple, list)) and sample else sample
    if not isinstance(x, torch.Tensor):
        raise BnnslimError(f"dataset '{dataset}' gives samples of type {type(x).__name__}, not tensors",
                           "the dataset plugin must return (tensor, label) pairs")
    if tuple(x.shape) != tuple(input_shape):
        got = "x".join(str(d) for d in x.shape)
        want = "x".join(str(d) for d in input_shape)
        raise BnnslimError(f"dataset '{dataset}' gives inputs of shape {got}, but the model would be trained on "
                           f"{want} (--input-shape, the dataset or INPUT_SHAPE)",
                           f"use --input-shape {','.join(str(d) for d in x.shape)} (the model must accept it), "
                           "or a dataset whose images match the model")
