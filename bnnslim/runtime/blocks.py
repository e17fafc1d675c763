"""Run a block with a ``forward`` of its own (a ResNet ``BasicBlock``) from a planned graph.

:class:`~bnnslim.runtime.segments.PackedSequential` runs plain sequences
without a module call per packed layer, but a block with its own ``forward``
still calls every child: at batch 1 that is a microsecond or more for each
layer fused or folded away (they only pass their input on), and its residual
add and the activation after it are two torch calls and two new tensors.

:func:`use_planned_blocks` gives such blocks a :class:`BlockForward` as their
``forward`` (an instance attribute; the class is untouched, so are the state
dict and ``isinstance``). On a call it traces the block once with torch.fx,
every child a leaf, and runs the rewritten graph:

- layers that pass their input on are dropped (:class:`FoldedAway`,
  :class:`ComputedByPackSigns`, ``nn.Identity``, and :class:`FusedAway` where
  its input is packed bits);
- a :class:`~bnnslim.runtime.segments.PackedSequential` child (a shortcut's 1x1
  conv and its batch norm) is inlined: its layers are called in turn, the ones
  that pass their input on dropped;
- a packed conv reading packed bits calls its kernel object directly (as in a
  packed sequence), and so does one reading floats where the input is what its
  kernel object was made for (:func:`run_on_floats`);
- a clamp called as a function (``F.relu(x)``) on a packed conv's output that
  the conv's epilogue already clamps is dropped;
- ``act(a + b)`` with ``act`` a Hardtanh, ReLU or ReLU6 used once becomes one
  add and an in-place clamp, in place on ``a`` where ``a`` is a packed conv's
  float output read by nothing else (the same values: torch's clamp is
  Hardtanh); where that conv is a direct kernel call, the kernel object's
  ``add_clamp`` does both as it finishes, one C++ call and one pass over the
  output (``benchmarks/runtime_planned_blocks.md``).

Where the rewritten graph is then only kernel calls and residual adds (a ResNet
``BasicBlock``, torchvision's ``BasicConv2d``), :func:`_program` makes it one C++
call (``BlockProgram``): no generated Python forward runs, and a
:class:`~bnnslim.runtime.segments.PackedSequential` of such blocks (a ResNet
stage) takes them as steps of its own plan, chained into one call
(:meth:`BlockForward.planned_program`); so does a block that calls such blocks
(RegNet's ``AnyStage``): their programs become steps of its plan (:func:`run_block`),
and of its program where nothing else is left. The program checks its input as
:func:`run_on_floats` does and the block's children against the plan's, and runs
the block as written otherwise (``runtime_planned_blocks_zen4.md``).

A new plan is checked once against the block's own forward on (copies of)
the input at hand, and dropped if they differ: torch.fx records ``out += y`` as
``out + y`` and an in-place activation as a new value, so a block that reads a
tensor again after changing it in place has a graph that is not what it does.

The plan is made again after any change to a packed layer or the runtime
(:mod:`bnnslim.runtime.changes`), a new child, or an ISA switch; the class's own
``forward`` runs instead for anything else than one tensor without autograd
(tracing, training mode), when hooks sit on a layer the plan skips, and for a
block torch.fx cannot trace. As with any torch.fx trace, plain attributes the
forward reads (a float scale, a flag) are taken as they are at the first call:
change them on a runtime model and call ``to_runtime`` again.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from typing import Any, TypeGuard

import torch
from torch import fx, nn

from bnnslim.runtime import build
from bnnslim.runtime.changes import changed
from bnnslim.runtime.fuse import CLAMPS, FoldedAway, FusedAway, functional_clamp
from bnnslim.runtime.layers import PackedBinaryConv2d
from bnnslim.runtime.segments import (
    NotPlannedYet,
    PackedSequential,
    block_program,
    gives_bits,
    hook_tables,
    hooked,
    passes_input_on,
    plan_key,
    reads_bits_on_kernel,
    run_on_floats,
)

Plan = tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Module]]

#: the layers a sequence may hold for :func:`_inline_sequences` to inline it
_INLINED = (PackedBinaryConv2d, FoldedAway, FusedAway, nn.Identity)

#: the residual adds :func:`_fuse_residual_clamps` takes (``out += identity`` traces as ``operator.iadd``)
_ADDS = (operator.add, operator.iadd, torch.add)

def add_clamp(a: torch.Tensor, b: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``clamp(a + b, lo, hi)`` in one new tensor."""
    return torch.add(a, b).clamp_(lo, hi)


def add_clamp_into(fresh: torch.Tensor, b: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``clamp(fresh + b, lo, hi)`` written into ``fresh`` (a tensor nothing else reads) where shapes and dtypes
    allow."""
    if fresh.shape == b.shape and fresh.dtype == b.dtype:
        return fresh.add_(b).clamp_(lo, hi)
    return add_clamp(fresh, b, lo, hi)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and values, NaN equal to NaN (an input with NaN must not cost a block its plan)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


class _LeafTracer(fx.Tracer):
    """Every submodule is a leaf: the block's own forward is what gets traced."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


class BlockForward:
    """A block's ``forward`` in a runtime model: runs its planned graph (module doc), or the class's forward."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        block = self.block
        if len(args) == 1 and not kwargs and not block.training:
            x = args[0]
            if isinstance(x, torch.Tensor):
                if not (x.requires_grad and torch.is_grad_enabled()):
                    plan = self._plan(x)
                    if plan is not None:
                        return plan(x)
            elif "_called_as_written" not in self.__dict__:
                self.__dict__["_called_as_written"] = True  # not one tensor (DenseNet's list): see planned_program
        return type(block).forward(block, *args, **kwargs)

    def _plan(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The planned forward for the block as it is now, made (and checked on ``x``) where there is none."""
        block = self.block
        key = (*plan_key(), *map(id, block._modules.values()))
        made = self.__dict__.get("_made")
        if made is None or made[0] != key:
            try:
                plan = plan_block(block)
            except NotPlannedYet:
                return None
            if plan is not None and not self._agrees(plan[0], x):
                plan = None
            made = (key, None if plan is None else (plan[0], hook_tables(plan[1])))
            self.__dict__["_made"] = made
        ready = made[1]
        if ready is None:
            return None
        run, tables = ready
        return None if hooked(tables) else run

    def planned_program(self) -> Any | None:
        """For a sequence's plan (:mod:`bnnslim.runtime.segments`): the block's plan where it is made for the
        runtime as it is now and is one C++ call (a ``BlockProgram``, which checks its input and the block's
        children itself), None where the block is to be called as a module; raises
        :class:`~bnnslim.runtime.segments.NotPlannedYet` where a call would make the plan first."""
        block = self.block
        if block.training:
            return None
        made = self.__dict__.get("_made")
        if made is None and self.__dict__.get("_called_as_written"):
            return None  # called with what a plan does not take: a module call, not a wait for a plan
        if made is None or made[0] != (*plan_key(), *map(id, block._modules.values())):
            raise NotPlannedYet
        ops = build.available_ops()
        ready = made[1]
        if ready is None or ops is None or not isinstance(ready[0], ops.BlockProgram):
            return None
        return ready[0]

    def _agrees(self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> bool:
        """Whether the plan gives the class forward's output on copies of ``x``, and leaves its copy as the class
        forward leaves its own. torch.fx records ``out += y`` on a traced value as ``out + y`` and an in-place
        activation as a new value, so a block that reads a tensor again after changing it in place has a graph
        that differs from what it does: such a block keeps its own forward."""
        mine, theirs = x.clone(), x.clone()
        with torch.no_grad():
            want = type(self.block).forward(self.block, theirs)
            got = run(mine)
        return isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and _same(want, got) \
            and _same(mine, theirs)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state.pop("_made", None)  # holds kernel objects and generated code; a copy plans for itself
        return state


def _attribute(block: nn.Module, target: str) -> Any:
    """``block``'s attribute at the dotted path ``target`` (a parameter or buffer of it or of a child)."""
    owner, _, name = target.rpartition(".")
    return getattr(block.get_submodule(owner) if owner else block, name)


def plan_block(block: nn.Module) -> Plan | None:
    """(the planned forward: one C++ call where :func:`_program` can make one, else the rewritten graph's
    generated forward; the children it no longer calls as modules), or None where the class's forward must run
    (torch.fx cannot trace it); raises :class:`NotPlannedYet` where a packed conv has no kernel object yet."""
    planned = plan_graph(block)
    if planned is None:
        return None
    module, bypassed = planned
    program = _program(module, block, build.available_ops())
    return (module.forward if program is None else program), bypassed


def plan_graph(block: nn.Module) -> tuple[fx.GraphModule, list[nn.Module]] | None:
    """(the rewritten graph, the children it no longer calls as modules), or None where the class's forward must
    run; raises :class:`NotPlannedYet` where a packed conv has no kernel object yet."""
    try:
        graph = _LeafTracer().trace(block)
    except Exception:  # any tracing failure: the block runs as written
        return None
    if sum(n.op == "placeholder" for n in graph.nodes) != 1:
        return None
    modules = dict(block.named_modules())
    ops = build.available_ops()
    attrs: dict[str, Any] = {}
    bypassed: list[nn.Module] = []
    bits: set[fx.Node] = set()  # nodes whose value is packed bits
    floats: dict[fx.Node, PackedBinaryConv2d] = {}  # packed convs' float outputs (new tensors)
    bypassed += _inline_sequences(graph, modules)
    for node in list(graph.nodes):
        if node.op == "call_function" and _clamped_already(node, floats):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        if node.op != "call_module":
            continue
        m = modules[str(node.target)]
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(src, fx.Node):
            continue
        if passes_input_on(m, src in bits):
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            bypassed.append(m)
            continue
        program = block_program(m, src in bits)  # may raise NotPlannedYet
        if program is not None:  # the child block's own plan is one C++ call: called without the module call
            name = f"_kernel_{len(attrs)}"
            attrs[name] = program
            with graph.inserting_before(node):
                direct = graph.call_function(run_block, (graph.get_attr(name), src))
            node.replace_all_uses_with(direct)
            graph.erase_node(node)
            bypassed += list(m.modules())
            continue
        if isinstance(m, PackedBinaryConv2d):
            if reads_bits_on_kernel(m, src in bits, ops):
                call = m.kernel_call()
                if call is None:
                    raise NotPlannedYet
                name = f"_kernel_{len(attrs)}"
                attrs[name] = call
                with graph.inserting_before(node):
                    direct = graph.call_method("__call__", (graph.get_attr(name), src))
                node.replace_all_uses_with(direct)
                graph.erase_node(node)
                bypassed.append(m)
                node = direct
            elif src not in bits and ops is not None and m.mode == "kernel" and not m.input_bits \
                    and (call := m.kernel_call()) is not None:
                name = f"_kernel_{len(attrs)}"
                attrs[name], attrs[f"{name}_layer"] = call, m
                with graph.inserting_before(node):
                    direct = graph.call_function(run_on_floats, (graph.get_attr(name), graph.get_attr(f"{name}_layer"),
                                                                 src))
                node.replace_all_uses_with(direct)
                graph.erase_node(node)
                bypassed.append(m)
                node = direct
            if m.out_thresholds is None:
                floats[node] = m
        if gives_bits(m, src in bits):
            bits.add(node)
    _fuse_residual_clamps(graph, modules, floats)
    graph.lint()
    root: dict[str, Any] = {str(n.target): modules[str(n.target)] for n in graph.nodes if n.op == "call_module"}
    for n in graph.nodes:  # the block's own parameters and buffers the forward reads (ConvNeXt's layer_scale)
        if n.op == "get_attr" and str(n.target) not in attrs:
            root[str(n.target)] = _attribute(block, str(n.target))
    root.update(attrs)
    return fx.GraphModule(root, graph, class_name=f"Planned{type(block).__name__}"), bypassed


def run_block(program: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A child block's program called from its parent's plan (the program checks its input itself)."""
    return program(x)


def _program(module: fx.GraphModule, block: nn.Module, ops: Any) -> Any | None:
    """The planned graph as one C++ call (``BlockProgram``), where every node is a packed conv's kernel object
    (reading floats or bits, with the residual add and clamp or without) or a residual add and clamp; None
    otherwise (the generated forward runs). Its input is checked as :func:`run_on_floats` checks it, and the
    block's children against the plan's: otherwise the block's own forward runs (through a weak reference, so
    that the program, which the block's plan holds, keeps no cycle through C++ that the collector cannot see)."""
    if ops is None:
        return None
    graph = module.graph
    attrs = {str(n.target): getattr(module, str(n.target)) for n in graph.nodes if n.op == "get_attr"}
    values: dict[fx.Node, int] = {}
    convs: list[Any] = []
    subs: list[Any] = []
    steps: list[tuple[int, int, int, int, float, float]] = []
    in_channels = -1
    out = -1

    def conv_index(kernel: object) -> int:
        if not (isinstance(kernel, fx.Node) and kernel.op == "get_attr" and str(kernel.target) in attrs):
            raise LookupError
        convs.append(attrs[str(kernel.target)])
        return len(convs) - 1

    def value(n: object) -> int:
        if not isinstance(n, fx.Node) or n not in values:
            raise LookupError
        return values[n]

    try:
        for node in graph.nodes:
            if node.op == "placeholder":
                values[node] = 0
                continue
            if node.op == "get_attr":
                continue  # kernel objects and their layers, read by the calls below (anything else: not a value)
            if node.op == "output":
                out = value(node.args[0])
                continue
            if node.op == "call_function" and node.target is run_on_floats:
                kernel, layer, src = node.args
                if value(src) == 0:
                    channels = attrs[str(layer.target)].in_channels
                    if in_channels not in (-1, channels):
                        return None
                    in_channels = channels
                steps.append((0, conv_index(kernel), value(src), -1, 0.0, 0.0))
            elif node.op == "call_function" and node.target is run_block:
                program, src = node.args
                subs.append(attrs[str(program.target)])
                steps.append((4, len(subs) - 1, value(src), -1, 0.0, 0.0))
            elif node.op == "call_method" and node.target == "__call__" and len(node.args) == 2:
                steps.append((0, conv_index(node.args[0]), value(node.args[1]), -1, 0.0, 0.0))
            elif node.op == "call_method" and node.target == "add_clamp":
                kernel, src, residual, lo, hi = node.args
                steps.append((1, conv_index(kernel), value(src), value(residual), float(lo), float(hi)))
            elif node.op == "call_function" and node.target in (add_clamp_into, add_clamp):
                a, b, lo, hi = node.args
                kind = 2 if node.target is add_clamp_into else 3
                steps.append((kind, -1, value(a), value(b), float(lo), float(hi)))
            else:
                return None
            values[node] = len(steps)
    except (LookupError, ValueError, TypeError, AttributeError):
        return None
    if out < 0 or not steps:
        return None
    ref = weakref.ref(block)

    def as_written(x: torch.Tensor, stale: bool) -> Any:
        b = ref()
        if b is None:
            raise RuntimeError("bnnslim runtime: the block of this planned call no longer exists")
        if stale:  # a child replaced: plain blocks do not report it, so the sequences holding this program replan
            changed()
        return type(b).forward(b, x)

    try:
        return ops.BlockProgram(convs, subs, steps, in_channels, out, block._modules,
                                list(block._modules.values()), as_written)
    except TypeError:  # an attribute the graph reads that is not a conv's kernel object
        return None


def _inline_sequences(graph: fx.Graph, modules: dict[str, nn.Module]) -> list[nn.Module]:
    """Replace each call of a sequence child by calls of its layers in turn, so that the plan drops the ones that
    pass their input on and the sequence's own call (a few microseconds at batch 1) goes; returns the sequences
    inlined. Inlined: a :class:`PackedSequential` of packed convs and layers folded into them (a ResNet's shortcut:
    a 1x1 conv and its folded batch norm), and any ``nn.Sequential`` subclass that keeps ``Sequential``'s forward
    (torchvision's ``Conv2dNormActivation``, RegNet's ``BottleneckTransform``), nested ones too. Other packed
    sequences (of blocks, or with poolings and sign packing, which the sequence's own plan runs without module
    calls) stay calls."""
    inlined: list[nn.Module] = []
    work = list(graph.nodes)
    while work:
        node = work.pop(0)
        seq = modules.get(str(node.target)) if node.op == "call_module" else None
        if not _inlined_here(seq) or len(node.args) != 1 or node.kwargs:
            continue
        assert isinstance(seq, nn.Sequential)
        value = node.args[0]
        calls = []
        with graph.inserting_before(node):
            for name, _ in seq.named_children():
                value = graph.call_module(f"{node.target}.{name}", (value,))
                calls.append(value)
        node.replace_all_uses_with(value)
        graph.erase_node(node)
        inlined.append(seq)
        work = calls + work  # a sequence inside it is inlined in turn
    return inlined


def _inlined_here(seq: nn.Module | None) -> bool:
    """Whether a block's plan runs ``seq``'s layers itself (:func:`_inline_sequences`)."""
    if isinstance(seq, PackedSequential):
        return all(isinstance(m, _INLINED) for m in seq)
    return isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward and len(seq) > 0


def _clamped_already(node: fx.Node, floats: dict[fx.Node, PackedBinaryConv2d]) -> bool:
    """Whether ``node`` is a functional clamp (``F.relu(x)``) of a packed conv's output whose epilogue already
    clamps at least as tightly (:func:`bnnslim.runtime.fuse.fold_float_tails`): then it changes nothing."""
    bounds = functional_clamp(node)
    layer = floats.get(node.args[0]) if bounds is not None else None  # type: ignore[arg-type]
    if layer is None or layer.out_clamp is None:
        return False
    lo, hi = (float(v) for v in layer.out_clamp)
    return bounds is not None and lo >= bounds[0] and hi <= bounds[1]


def _fuse_residual_clamps(graph: fx.Graph, modules: dict[str, nn.Module],
                          floats: dict[fx.Node, PackedBinaryConv2d]) -> None:
    """``act(a + b)`` -> :func:`add_clamp` (in place on a packed conv's float output, ``floats``, that only the
    add reads; the kernel object's ``add_clamp`` where that conv is a direct kernel call); ``a += b`` only where
    ``a`` is such an output (elsewhere others may see the change)."""
    for node in list(graph.nodes):
        act = modules[str(node.target)] if node.op == "call_module" else None
        if type(act) is FusedAway:
            act = act.original  # a shared activation, fused away elsewhere: here it computes on real values
        if act is None or type(act) not in CLAMPS or len(node.args) != 1 or node.kwargs:
            continue
        add = node.args[0]
        if not (isinstance(add, fx.Node) and add.op == "call_function" and add.target in _ADDS
                and len(add.args) == 2 and not add.kwargs and len(add.users) == 1
                and all(isinstance(a, fx.Node) for a in add.args)):
            continue
        lo, hi = CLAMPS[type(act)](act)
        a, b = add.args

        def fresh(n: object) -> bool:
            return isinstance(n, fx.Node) and n in floats and len(n.users) == 1

        if add.target is operator.iadd and not fresh(a):
            continue  # ``a += b`` changes a tensor something else may read: left as written
        if fresh(b) and (not fresh(a) or (_kernel_node(b) and not _kernel_node(a))):
            a, b = b, a  # a + b == b + a elementwise in float; prefer a fresh direct kernel call as ``a``
        with graph.inserting_before(node):
            if fresh(a) and _kernel_node(a):  # the conv's kernel adds and clamps as it finishes (one C++ call)
                kernel, src = a.args
                new = graph.call_method("add_clamp", (kernel, src, b, lo, hi))
            else:
                new = graph.call_function(add_clamp_into if fresh(a) else add_clamp, (a, b, lo, hi))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(add)
        if _kernel_node(a) and not a.users:
            graph.erase_node(a)


def _kernel_node(n: object) -> TypeGuard[fx.Node]:
    """Whether ``n`` calls a packed conv's kernel object directly (:func:`plan_block`)."""
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target == "__call__"


def use_planned_blocks(model: nn.Module) -> None:
    """Give every module of ``model`` with a forward of its own and children (not a torch layer, sequence or
    packed layer) a :class:`BlockForward` (in place)."""
    for m in model.modules():
        cls = type(m)
        if not m._modules or cls.__module__.startswith("torch.") or isinstance(m, (PackedSequential, fx.GraphModule)) \
                or isinstance(m.__dict__.get("forward"), BlockForward):
            continue
        m.forward = BlockForward(m)
    changed()
