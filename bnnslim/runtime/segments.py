"""Run an ``nn.Sequential`` of the packed runtime without a module call per packed layer.

At batch 1 a module call and the checks at the top of a packed layer's
``forward`` cost a few microseconds, as much as a small late layer's
arithmetic (a 256 -> 256 3x3 conv at 2x2). Inside a fused chain what each
layer receives is known from the layer before it (packed bits after a
:class:`~bnnslim.runtime.fuse.PackSigns`, a thresholded conv or a bit max
pooling), so :class:`PackedSequential` settles those checks once: it plans its
children into steps (a packed conv reading bits calls its kernel object
directly, a bit max pooling its kernel, a sign packing and a pooled tail their
bound op, a packed conv reading floats its kernel object behind a check of the
input, a layer folded or fused away is skipped, everything else is called as
the module it is, except a block planned as one C++ call
(:mod:`bnnslim.runtime.blocks`), which is a step itself; sequences nested in it
are flattened into its plan; a run of C++ steps, convs and bit poolings on
packed bits and planned blocks, is one C++ call) and
replans whenever a
packed layer or the sequence changes (an attribute assigned or a conversion such as ``.half()``:
:class:`~bnnslim.runtime.changes.ChangeTracked` calls :func:`bnnslim.runtime.changes.changed`), when the kernel
ISA is switched,
or when hooks are registered on a layer it would not call.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from bnnslim.runtime import build
from bnnslim.runtime.changes import ChangeTracked, changed, generation
from bnnslim.runtime.fuse import ComputedByPackSigns, FoldedAway, FusedAway, PackedMaxPool2d, PackSigns
from bnnslim.runtime.layers import PackedBinaryConv2d
from bnnslim.runtime.tails import PooledLinear

Step = Callable[[torch.Tensor], torch.Tensor]

class PackedSequential(ChangeTracked, nn.Sequential):
    """An ``nn.Sequential`` of a runtime model: runs of packed layers run without module calls (see module doc).

    :func:`bnnslim.runtime.to_runtime` gives every plain ``nn.Sequential`` of a fused model this class (same
    children, same state dict). A layer changed through ``layer._buffers[...]`` directly is not noticed:
    assign attributes instead.
    """


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self._steps(x)
        if steps is None:
            return super().forward(x)
        for step in steps:
            x = step(x)
        return x

    def _steps(self, x: object) -> list[Step] | None:
        """The planned steps, or None where the plain module-by-module call must run."""
        if not isinstance(x, torch.Tensor) or (x.requires_grad and torch.is_grad_enabled()):
            return None  # tracing, or autograd: the layers' own forward handles those
        key = plan_key()
        plan = self.__dict__.get("_plan")
        if plan is None or plan[0] != key:
            made = plan_steps(list(self))
            if made is None:
                return None  # a layer has not built its fast path yet: the next call plans
            steps, bypassed = made
            plan = (key, steps, hook_tables(bypassed))
            self.__dict__["_plan"] = plan
        _, steps, tables = plan
        return None if hooked(tables) else steps

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state.pop("_plan", None)  # holds kernel objects; a copy plans for itself
        return state


def plan_key() -> tuple[object, ...]:
    """What every plan of packed layers depends on beyond its own modules: the changes so far, the ISA forced
    through the environment, the kernel build in use."""
    return (generation(), build.env_isa(), id(build._status))


def hook_tables(bypassed: list[nn.Module]) -> list[dict[int, Any]]:
    """The forward (pre-)hook dicts of the layers a plan does not call as modules, for :func:`hooked`: torch
    registers and removes hooks in these very dicts."""
    return [table for m in bypassed for table in (m._forward_hooks, m._forward_pre_hooks)]


def hooked(tables: list[dict[int, Any]]) -> bool:
    """Whether hooks would miss a call: global module hooks, or hooks on a layer a plan does not call as a module
    (``tables`` from :func:`hook_tables`; one C-level ``any`` over them, as every batch-1 call checks this)."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks or any(tables))


def passes_input_on(child: nn.Module, bits: bool) -> bool:
    """Whether ``child`` returns its input unchanged, given whether that input is packed bits (``bits``)."""
    return type(child) in (FoldedAway, ComputedByPackSigns, nn.Identity) or (isinstance(child, FusedAway) and bits)


def reads_bits_on_kernel(child: nn.Module, bits: bool, ops: object) -> bool:
    """Whether ``child`` is a packed conv that reads the packed bits it gets (``bits``) on the kernels (``ops``
    not None): a plan may call its kernel object directly."""
    return bits and ops is not None and isinstance(child, PackedBinaryConv2d) and child.input_bits \
        and child.mode == "kernel"


def gives_bits(child: nn.Module, bits: bool) -> bool:
    """Whether ``child``'s output is packed bits, given whether its input is (``bits``)."""
    if isinstance(child, PackedBinaryConv2d):
        return child.out_thresholds is not None
    return isinstance(child, (PackSigns, PackedMaxPool2d)) or (bits and isinstance(child, FusedAway))


def run_on_floats(call: Callable[[torch.Tensor], torch.Tensor], layer: PackedBinaryConv2d,
                  x: torch.Tensor) -> torch.Tensor:
    """A packed conv reading floats: its kernel object on ``x`` where ``x`` is what that object was made for
    (float32, 4-d, the layer's input channels, on the CPU), the layer's own call otherwise (a microsecond or two
    less per call than the module call, which checks the same and more)."""
    if x.dtype is torch.float32 and x.dim() == 4 and x.shape[1] == layer.in_channels and x.device.type == "cpu":
        return call(x)
    return layer(x)


def _direct_step(child: nn.Module, bits: bool, ops: object) -> Step | None:
    """What a plan calls in place of ``child`` (given whether its input is packed bits), or None for a module call:
    a packed conv's kernel object (reading floats: guarded by :func:`run_on_floats`), a bit max pooling's op, a
    sign packing's or a pooled tail's bound op; raises :class:`NotPlannedYet` for a conv reading bits before its first
    call has made its kernel object."""
    if ops is None:
        return None
    if reads_bits_on_kernel(child, bits, ops):
        assert isinstance(child, PackedBinaryConv2d)
        direct = child.kernel_call()
        if direct is None:
            raise NotPlannedYet
        return direct
    if isinstance(child, PackedBinaryConv2d) and not bits and not child.input_bits and child.mode == "kernel":
        call = child.kernel_call()
        return None if call is None else partial(run_on_floats, call, child)
    if bits and isinstance(child, PackedMaxPool2d) and child.mode == "kernel":
        return ops.PackedPoolCall(*child.pool_geometry)  # type: ignore[attr-defined]
    if isinstance(child, (PackSigns, PooledLinear)):
        return child.direct_call()
    return block_program(child, bits)


def block_program(child: nn.Module, bits: bool) -> Step | None:
    """``child``'s plan where it is a block planned as one C++ call (its ``BlockForward.planned_program``, in
    :mod:`bnnslim.runtime.blocks`), for a plan that would otherwise call it as a module; None where it is to be
    called as a module (not a block, its input packed bits, or its plan not one call); raises
    :class:`NotPlannedYet` where its next call makes that plan."""
    planned = getattr(child.__dict__.get("forward"), "planned_program", None)
    return planned() if planned is not None and not bits else None


class NotPlannedYet(Exception):
    """A layer or block that a plan would call directly has not made its kernel object or its own plan yet (its
    next call as a module does)."""


def _flattened(children: list[nn.Module], bypassed: list[nn.Module]) -> list[nn.Module]:
    """``children`` with every :class:`PackedSequential` among them replaced by its own children, recursively (a
    model that nests its stages in sequences): one plan runs them all, packed bits pass from one sequence to the
    next without a module call, and the nested sequences join ``bypassed`` (a hook on one stops the plan)."""
    flat: list[nn.Module] = []
    for child in children:
        if type(child) is PackedSequential:
            bypassed.append(child)
            flat += _flattened(list(child), bypassed)
        else:
            flat.append(child)
    return flat


def plan_steps(children: list[nn.Module]) -> tuple[list[Step], list[nn.Module]] | None:
    """(steps, the children they do not call as modules) for a sequence, nested sequences flattened, or None if a
    packed conv that would be called directly has not made its kernel object yet."""
    ops = build.available_ops()
    steps: list[Step] = []
    bypassed: list[nn.Module] = []
    bits = False  # whether the previous step hands on packed bits
    for child in _flattened(children, bypassed):
        if passes_input_on(child, bits):
            bypassed.append(child)
            continue
        try:
            direct = _direct_step(child, bits, ops)
        except NotPlannedYet:
            return None
        if direct is not None:
            steps.append(direct)
            # a block's program calls none of the block's layers as modules: a hook on any of them stops the plan
            program = ops is not None and isinstance(direct, ops.BlockProgram)
            bypassed += list(child.modules()) if program else [child]
        else:
            steps.append(child)
        bits = gives_bits(child, bits)
    return _chained(steps, ops), bypassed


def _chained(steps: list[Step], ops: object) -> list[Step]:
    """``steps`` with each run of two or more C++ calls (convs' kernel objects on packed bits, bit poolings, blocks
    planned as one call) made one ``PackedChain``: one call from Python for the run, its intermediate tensors
    never wrapped for Python."""
    if ops is None:
        return steps
    native = (ops.PackedConvCall, ops.PackedPoolCall, ops.BlockProgram)  # type: ignore[attr-defined]
    out: list[Step] = []
    run: list[Step] = []
    for step in [*steps, None]:
        if step is not None and isinstance(step, native):
            run.append(step)
            continue
        out += [ops.PackedChain(run)] if len(run) > 1 else run  # type: ignore[attr-defined]
        run = []
        if step is not None:
            out.append(step)
    return out


def use_packed_sequences(model: nn.Module) -> None:
    """Give every plain ``nn.Sequential`` in ``model`` the :class:`PackedSequential` class (in place)."""
    for m in model.modules():
        if type(m) is nn.Sequential:
            m.__class__ = PackedSequential
    changed()
