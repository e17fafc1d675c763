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


def dead_model_warnings(outputs: Any, accuracy: float | None) -> list[str]:
    """Warnings for a model that no longer depends on its input: constant outputs, or accuracy at chance.

    ``outputs`` are the logits ``[batch, classes]`` for different inputs (e.g. a
    random probe batch). A binarized network can die (a last ReLU that outputs 0
    everywhere): then slim == masked holds trivially, so it must be said.
    """
    found = []
    if outputs is not None and outputs.dim() == 2 and outputs.shape[0] > 1:
        spread = float((outputs.max(dim=0).values - outputs.min(dim=0).values).abs().max())
        if spread < 1e-6:
            found.append("the model's output is the same for every input (spread "
                         f"{spread:.1g} over {outputs.shape[0]} different inputs): it is dead, e.g. a ReLU "
                         "that outputs 0 everywhere; prune less, retrain longer, or use a signed activation")
        found += chance_warnings(accuracy, outputs.shape[1])
    return found


def dead_model_check(model: Any, probe: Any, accuracy: float | None, classes: int | None) -> list[str]:
    """:func:`dead_model_warnings` on ``model``'s eval-mode outputs for ``probe`` (different inputs); a model whose
    output is not a logits tensor gets the chance check alone (``bnnslim prune`` and ``export`` call this)."""
    import torch

    from bnnslim.modes import eval_outputs

    outputs = eval_outputs(model, probe)
    if isinstance(outputs, torch.Tensor):
        return dead_model_warnings(outputs, accuracy)
    return chance_warnings(accuracy, classes)


def chance_warnings(accuracy: float | None, classes: int | None) -> list[str]:
    """A warning when ``accuracy`` is no better than guessing among ``classes``."""
    if accuracy is None or not classes or classes < 2 or accuracy > 1.25 / classes:
        return []
    return [f"test accuracy {accuracy:.1%} is at chance for {classes} classes ({1 / classes:.1%}): the model does "
            "not classify (dead layers, too few filters kept, or too little retraining)"]


def _names(layers: list[str]) -> str:
    return ", ".join(layers[:5]) + (f" and {len(layers) - 5} more" if len(layers) > 5 else "")


def binarization_warnings(model: Any, example: Any) -> list[str]:
    """What the README advises against, found in a binarized model on an example batch (one line per kind).

    * a binary conv whose input is never negative (after a ReLU, sigmoid, ...):
      ``sign()`` then sees only {0, +1};
    * a binary 1x1 conv on a pooled 1x1 map (squeeze-excitation): it gates
      whole channels, and binarizing it costs accuracy for nothing;
    * a binary depthwise conv: the packed runtime runs it in float anyway.
    """
    from bnnslim.binary.layers import BinaryConv2d
    from bnnslim.modes import eval_outputs

    seen: dict[str, Any] = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: seen.__setitem__(n, args[0].detach()))
               for n, m in model.named_modules() if isinstance(m, BinaryConv2d)]
    try:
        eval_outputs(model, example)
    finally:
        for h in handles:
            h.remove()
    convs = dict(model.named_modules())
    non_negative = [n for n, x in seen.items() if x.numel() and float(x.min()) >= 0]
    pooled = [n for n, x in seen.items() if x.dim() == 4 and x.shape[-2:] == (1, 1)
              and convs[n].kernel_size == (1, 1)]
    depthwise = [n for n in seen if convs[n].groups > 1 and convs[n].groups == convs[n].in_channels]
    found = []
    if non_negative:
        found.append(f"binary conv(s) {_names(non_negative)} never see a negative input (a ReLU or similar before "
                     "them): sign() then sees only {0, +1}; use a signed activation (Hardtanh, PReLU or none) before "
                     "a binary conv, or keep them real with --real")
    if pooled:
        found.append(f"binary 1x1 conv(s) {_names(pooled)} run on pooled 1x1 maps (squeeze-excitation gates): "
                     "binarizing them costs accuracy and saves little; keep them real with --real")
    if depthwise:
        found.append(f"binary depthwise conv(s) {_names(depthwise)}: the packed runtime runs depthwise convs in "
                     "float anyway; keep them real with --real unless you target another runtime")
    return found


def warn_about_binarization(model: Any, example: Any) -> None:
    """Emit :func:`binarization_warnings` as :class:`BnnslimWarning` (the command line prints each once)."""
    import warnings

    from bnnslim.errors import BnnslimWarning

    for message in binarization_warnings(model, example):
        warnings.warn(message, BnnslimWarning, stacklevel=2)
