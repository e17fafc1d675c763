"""Turn a model with ``BinaryConv2d`` layers into a runtime model.

Each ``BinaryConv2d`` becomes a :class:`PackedBinaryConv2d` packed from its
scheme's weight signs and scale; every other layer (the real first and last
layers, batch norms, pools, activations) stays the torch module it was.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from bnnslim.binary.layers import BinaryConv2d
from bnnslim.errors import BnnslimError
from bnnslim.runtime.layers import PackedBinaryConv2d

# Inputs on which a scheme's input binarization must agree with sign() (sign(0) = 0)
_PROBE = torch.tensor([-1e30, -3.0, -1.0, -0.5, -1e-30, 0.0, 1e-30, 0.5, 1.0, 3.0, 1e30])


@dataclass
class RuntimePlan:
    """How each binary conv of a converted model runs."""

    kernel: list[str] = field(default_factory=list)           # packed, C++ kernel
    fused: dict[str, str] = field(default_factory=dict)       # writes packed bits for this consumer
    fused_also: dict[str, list[str]] = field(default_factory=dict)  # ... and for these (a branch point)
    not_fused: dict[str, str] = field(default_factory=dict)   # on the kernels, float output: why
    folded: dict[str, list[str]] = field(default_factory=dict)  # batch norm / activation in its epilogue (or weights)
    packed_inputs: dict[str, list[str]] = field(default_factory=dict)  # reads bits: the real layers skipped
    emulated: dict[str, str] = field(default_factory=dict)    # packed, torch emulation: reason
    unchanged: dict[str, str] = field(default_factory=dict)   # left a BinaryConv2d: reason


def _sign_like_input(layer: BinaryConv2d) -> bool:
    with torch.no_grad():
        got = layer.scheme.binarize_input(_PROBE.to(layer.weight.dtype))
    return bool(torch.equal(got.float(), torch.sign(_PROBE)))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _inputs_to_channels_last(_module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)


def to_runtime(model: nn.Module, *, inplace: bool = False, channels_last: bool = True,
               packed: Mapping[str, torch.Tensor] | None = None, fuse: bool = True) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself) with every BinaryConv2d packed, in eval mode.

    ``packed`` is the tensors of a packed model file (``<layer>.weight_bits``,
    ``<layer>.alpha``): each BinaryConv2d then takes its bits and alpha from
    there, exactly as exported, instead of re-deriving them from its latent
    weights; a layer whose bits are missing or misshapen is an error.

    A BinaryConv2d whose scheme binarizes inputs other than by ``sign`` (with
    sign(0) = 0) or weights to values other than -1/+1 cannot be packed: it is
    left as it is (see :func:`runtime_plan`).

    With ``channels_last`` (the default) the model converts 4-d inputs to the
    channels-last memory format on entry (and real convs' weights too), so every
    layer after runs channels-last: the packed convs pack contiguous channels and
    write channels-last outputs, and torch's pooling and batch norm are much
    faster on CPU in that format. Values are the same either way; a 4-d output
    comes back channels-last (call ``.contiguous()`` for NCHW memory). Where
    every layer that reads the inputs is an image's first conv run by bnnslim's
    small-conv kernel (which takes any memory format), the inputs are left as
    they come.

    With ``fuse`` (the default) binary convs that feed other binary convs
    through batch norm, activations and max pooling hand them packed bits
    (:mod:`bnnslim.runtime.fuse`; exact, with per-channel integer thresholds).
    The model is then for inference in eval mode only.
    """
    target = model if inplace else copy.deepcopy(model)
    for name, module in list(target.named_modules()):
        if not isinstance(module, BinaryConv2d):
            continue
        if not _sign_like_input(module):
            module.runtime_reason = f"scheme '{module.scheme.name}' does not binarize inputs with sign()"  # type: ignore[assignment]
            continue
        if packed is not None:
            bits = packed.get(f"{name}.weight_bits")
            if bits is None:
                raise BnnslimError(f"the packed tensors lack '{name}.weight_bits'", "export the model again")
            alpha = packed.get(f"{name}.alpha")
            if (alpha is None) != (module.scheme.scale(module.weight.detach(), None) is None):
                raise BnnslimError(f"'{name}.alpha' is {'missing' if alpha is None else 'present'} but scheme "
                                   f"'{module.scheme.name}' {'has' if alpha is None else 'has no'} scale",
                                   "the file is corrupted or from another bnnslim version: export it again")
            _set_submodule(target, name, PackedBinaryConv2d.from_binary_conv(module, bits, alpha))
            continue
        try:
            layer = PackedBinaryConv2d.from_binary_conv(module)
        except BnnslimError as exc:
            module.runtime_reason = exc.problem  # type: ignore[assignment]
            continue
        _set_submodule(target, name, layer)
    if channels_last:
        for module in target.modules():
            if type(module) is nn.Conv2d:
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    target.eval()
    layout_free = False
    if fuse:
        from bnnslim.runtime.blocks import use_planned_blocks
        from bnnslim.runtime.fuse import fuse_binary_chains, reads_inputs_in_any_layout
        from bnnslim.runtime.segments import use_packed_sequences
        from bnnslim.runtime.tails import fold_pooled_tails

        report = fuse_binary_chains(target, channels_last=channels_last)
        if report.graph is not None:
            fold_pooled_tails(target, report.graph)
            layout_free = reads_inputs_in_any_layout(target, report.graph)
        use_packed_sequences(target)
        use_planned_blocks(target)
    if channels_last and not layout_free:
        target.register_forward_pre_hook(_inputs_to_channels_last)
    return target


def with_emulation(model: nn.Module) -> nn.Module:
    """A copy of a runtime model whose packed convs all run the torch emulation.

    The emulation computes the same exact integer counts (a float conv of the
    unpacked +-1 weights) and the same ``count * alpha + bias``, so its outputs
    equal the kernels' bit for bit: the reference for whole-model checks. (The
    original ``BinaryConv2d`` model sums ``alpha``-scaled terms in float, so a
    dot product that is exactly 0 can come out as +-1e-8 there, and a following
    sign() may then differ.)
    """
    from bnnslim.runtime.fuse import PackedMaxPool2d, PackSigns

    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, (PackedBinaryConv2d, PackedMaxPool2d, PackSigns)):
            module.use_emulation("emulation requested")
    return twin


def runtime_plan(model: nn.Module) -> RuntimePlan:
    """Which binary convs of a runtime model run the kernel, the emulation, or were left unchanged, and why."""
    from bnnslim.runtime import build
    from bnnslim.runtime.fuse import FoldedAway

    plan = RuntimePlan()
    status = build.kernel_status()
    for name, module in model.named_modules():
        # a folded layer, or the layer that took its place when a chain was packed (PackSigns, FusedAway)
        folded = module if isinstance(module, FoldedAway) else getattr(module, "original", None)
        if isinstance(folded, FoldedAway):
            plan.folded.setdefault(folded.into, []).append(name)
        if isinstance(module, PackedBinaryConv2d):
            if module.packed_chain:
                plan.packed_inputs[name] = [n for n, _ in module.packed_chain]
            if module.mode == "emulation":
                plan.emulated[name] = module.reason or "emulation chosen"
            elif not status.available:
                plan.emulated[name] = f"kernels not available: {status.reason}"
            else:
                plan.kernel.append(name)
                if module.fused_into is not None:
                    plan.fused[name] = module.fused_into
                    if module.fused_also:
                        plan.fused_also[name] = list(module.fused_also)
                elif getattr(module, "fuse_reason", None):
                    plan.not_fused[name] = str(module.fuse_reason)
        elif isinstance(module, BinaryConv2d):
            plan.unchanged[name] = str(getattr(module, "runtime_reason", "not converted"))
    return plan
