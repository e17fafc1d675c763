"""Fused binary blocks: binary convs that hand packed bits to the next binary conv.

In a runtime model, a packed binary conv P whose output reaches another packed
binary conv C only through per-channel elementwise layers (batch norm in eval
mode, Hardtanh, ReLU, ...) and at most one max pooling, each used once, gives C
nothing but the signs of the result: C binarizes its input with sign(). Those
signs are a function of P's integer dot product per channel, so they are
computed exactly by running the very same torch layers on every possible dot
product ``-K..K`` (``K`` = P's inputs per output) in the memory format the model
runs, then reading off per-channel integer thresholds (a batch norm with
negative scale gives a decreasing step: the comparison flips). P then writes
packed bits (:mod:`bnnslim.runtime.bits`), the elementwise layers become
:class:`FusedAway`, the pooling a :class:`PackedMaxPool2d` (an OR of bits), and
C reads the bits: no float tensor, batch norm or re-packing in between.

A packed conv whose float output goes to an eval-mode batch norm alone (and
from it, maybe, to a Hardtanh, ReLU or ReLU6 alone) takes them into its own
epilogue instead (:func:`fold_float_tails`): the batch norm's per-channel
affine map into ``alpha`` and ``bias`` (``y = dot * alpha' + bias'``), the
activation into a clamp. At batch 1 each of those torch calls costs tens of
microseconds, more than the arithmetic; folding changes the float rounding by
an ulp or so (the runtime and its emulation still agree bit for bit).

The same holds before the chains: a real conv followed by a batch norm alone
takes it into its weights and bias (:func:`fold_real_conv_batch_norms`), and a
binary conv whose input comes through sign-keeping layers (Hardtanh with
``min < 0 < max``, Identity, Dropout), ReLU-like ones (ReLU, ReLU6, Hardtanh
with ``min = 0``) and at most one max pooling from a real layer
(:func:`pack_sign_chains`) gets packed bits from a :class:`PackSigns`
(``sign(hardtanh(x)) = sign(x)``, ``sign(relu(x)) = sign(x) > 0``: +1 or 0,
and max pooling commutes with both): the float activation and pooling are not
run. An eval-mode batch norm just before the activation, read by it alone (DenseNet's
BN-ReLU-conv on a concatenation, where no conv takes the batch norm in), goes into the
:class:`PackSigns` as a per-channel ``x * s + t`` before the signs. Where that real layer is a conv with
few input channels and filters (an image's first conv, :data:`SIGN_CONV_MAX_MACS`)
used only there, the :class:`PackSigns` computes the conv too and writes the signs
of its output without storing the floats (the conv's sums run in another order
than torch's, so only outputs within float rounding of 0 can change sign).

Max pooling commutes with the signs only where every layer before it is monotone
per channel and the whole chain is monotone the same way; otherwise (or for a
non-monotone activation, a shared layer, a functional call in between, a model
torch.fx cannot trace) the chain is left as it is and the reason recorded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnnslim.runtime import build, changes
from bnnslim.runtime.bits import max_pool_emulated, pack_ternary, thresholds_ternary
from bnnslim.runtime.layers import PackedBinaryConv2d

#: layers that act on each element with per-channel parameters at most (exact types: a subclass may differ)
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.BatchNorm2d, nn.Hardtanh, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.Tanh, nn.Sigmoid, nn.SiLU, nn.GELU, nn.ELU, nn.Softsign, nn.Hardsigmoid, nn.Hardswish, nn.Mish,
)


class FusedAway(nn.Module):
    """A layer folded into a binary conv's output thresholds: passes the packed bits through.

    A stateless layer (no parameters or buffers, e.g. a ReLU module that a
    block calls twice) may also be called elsewhere on real values: those it
    computes as before.
    """

    original: nn.Module  # set with object.__setattr__, see __init__

    def __init__(self, original: nn.Module, into: str) -> None:
        super().__init__()
        self.into = into
        object.__setattr__(self, "original", original)  # not a submodule: the state dict keeps its keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.int64 and x.dim() == 5:
            return x
        return self.original(x)

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__} folded into the thresholds of '{self.into}'"


class FoldedAway(nn.Module):
    """A batch norm or activation folded into a packed conv's float epilogue (or a real conv's weights): passes
    its input through. ``runtime_plan`` lists these under the layer they went into."""

    original: nn.Module  # set with object.__setattr__, as in FusedAway

    def __init__(self, original: nn.Module, into: str, where: str = "the epilogue of") -> None:
        super().__init__()
        self.into = into
        self.where = where
        object.__setattr__(self, "original", original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__} folded into {self.where} '{self.into}'"


#: activations a float epilogue can take as a clamp [lo, hi]
CLAMPS: dict[type[nn.Module], Callable[[Any], tuple[float, float]]] = {
    nn.Hardtanh: lambda m: (float(m.min_val), float(m.max_val)),
    nn.ReLU: lambda m: (0.0, float("inf")),
    nn.ReLU6: lambda m: (0.0, 6.0),
}


#: a real conv is computed by the :class:`PackSigns` after it when it has at most this many input channels (an
#: image's) and at most this many multiply-adds per output pixel (in x kh x kw x out): the direct kernel
#: (register tiles of 12 pixels x 32 channels with AVX-512, 6 x 16 with AVX2 FMA) beats torch's conv plus
#: packing 1.2-4.5x, with torch on AVX-512 and on AVX2 alike, on every conv measured: 3 -> 32 3x3 (VGG) up to
#: 3 -> 192 5x5 (NIN's is 3 -> 192 at full width) and a 3 -> 64 7x7 stride-2 stem
#: (benchmarks/runtime_first_conv.md); larger convs are not measured
SIGN_CONV_MAX_INPUTS = 4
SIGN_CONV_MAX_MACS = 16384


#: a real conv with float outputs that do not go into a fused chain (ResNet's stem, read by a binary conv and
#: the shortcut) is computed by the same kernel, with a clamp activation after it, where it has at most
#: SIGN_CONV_MAX_INPUTS inputs and this many multiply-adds per output pixel: from 3 -> 32 3x3 to 3 -> 192 5x5
#: and a 3 -> 64 7x7 stride-2 stem (torchvision's ResNets) it runs 1.2-4.7x faster than torch's conv and
#: Hardtanh, with torch on AVX-512 and on AVX2 (benchmarks/runtime_first_conv.md; since its tiles read the
#: padded input directly, without a patch copy per row: before that only convs up to 2048 won)
SMALL_CONV_MAX_MACS = 16384


def _kernel_layout(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The small-conv kernel's weights ``[kh, kw, in, out rounded up to 8]`` and bias (extra channels zero)."""
    w = conv.weight.detach().float()
    out = -(-conv.out_channels // 8) * 8
    weight = torch.zeros(*w.shape[2:], conv.in_channels, out, device=w.device)
    weight[..., :conv.out_channels] = w.permute(2, 3, 1, 0)
    bias = torch.zeros(out, device=w.device)
    if conv.bias is not None:
        bias[:conv.out_channels] = conv.bias.detach().float()
    return weight, bias


class PackSigns(changes.ChangeTracked):
    """A sign-keeping layer where a real activation enters a fused chain: writes the signs of its input as bits.

    With ``conv`` (a real conv whose output only this layer takes, now a
    :class:`ComputedByPackSigns`), it takes the conv's input and writes the
    signs of ``conv(x)`` directly. With ``batch_norm`` (an eval-mode batch norm
    just before the activation, now a :class:`FoldedAway`; DenseNet's
    BN-ReLU-conv), it writes the signs of ``x * s + t`` (the batch norm's
    per-channel affine map, float32, multiply then add) without running it.
    """

    original: nn.Module  # set with object.__setattr__, as in FusedAway
    conv: nn.Conv2d | None

    def __init__(self, original: nn.Module, into: str, conv: nn.Conv2d | None = None, positive: bool = False,
                 batch_norm: nn.BatchNorm2d | None = None) -> None:
        super().__init__()
        self.into = into
        self.mode = "kernel"
        #: a ReLU-like layer is on the way: the consumer sees relu(x)'s signs, +1 or 0 (never -1)
        self.positive = positive
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "conv", conv)
        if batch_norm is not None:
            s, t = batch_norm_affine(batch_norm)
            self.register_buffer("bn_scale", s.float(), persistent=False)
            self.register_buffer("bn_shift", t.float(), persistent=False)
        if conv is not None:
            weight, bias = _kernel_layout(conv)
            self.register_buffer("conv_weight", weight, persistent=False)
            self.register_buffer("conv_bias", bias, persistent=False)
            #: the kernel's arguments after weights and bias (built once: forward is on the batch-1 hot path)
            self.conv_geometry = (*conv.kernel_size, list(conv.stride), list(conv.padding))


    def use_emulation(self, reason: str) -> None:
        """Pack through torch from now on."""
        self.mode = "emulation"
        self.reason = reason

    def direct_call(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What a plan (:mod:`bnnslim.runtime.segments`) may call in place of this module on the kernels: the op
        with its arguments bound, this layer's ``forward`` for an input the op does not take; None off the
        kernels. Made again with the plan (every change of this layer, the ISA forced, the kernel build)."""
        ops = build.available_ops() if self.mode == "kernel" else None
        if ops is None:
            return None
        forward, isa = self.forward, build.isa_code()
        if self.conv is not None:
            op, args = ops.conv_sign_bits, (self.conv_weight, self.conv_bias, *self.conv_geometry, isa, self.positive)

            def run_conv(x: torch.Tensor) -> torch.Tensor:
                return op(x, *args) if x.dtype is torch.float32 else forward(x)

            return run_conv
        scale, shift = self.affine or (None, None)
        channels = None if scale is None else scale.numel()
        pack, positive = ops.pack_signs, self.positive

        def run_pack(x: torch.Tensor) -> torch.Tensor:
            if x.dtype is torch.float32 and (channels is None or (x.dim() > 1 and x.shape[1] == channels)):
                return pack(x, isa, positive, scale, shift)
            return forward(x)

        return run_pack

    @property
    def affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The folded batch norm's per-channel (scale, shift), float32, or None."""
        buffers = self._buffers
        scale, shift = buffers.get("bn_scale"), buffers.get("bn_shift")
        return None if scale is None or shift is None else (scale, shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        ops = build.available_ops() if self.mode == "kernel" else None
        affine = self.affine
        if ops is not None and x.dtype == torch.float32 and (affine is None or x.shape[1] == affine[0].numel()):
            if conv is None:
                scale, shift = affine if affine is not None else (None, None)
                return ops.pack_signs(x, build.isa_code(), self.positive, scale, shift)
            return ops.conv_sign_bits(x, self.conv_weight, self.conv_bias, *self.conv_geometry, build.isa_code(),
                                      self.positive)
        if conv is not None:
            x = conv(x)
        x = x.float()
        if affine is not None:  # two float32 roundings, as the kernel: x * s, then + t
            x = x * affine[0].view(1, -1, 1, 1) + affine[1].view(1, -1, 1, 1)
        x = torch.nan_to_num(x, nan=0.0)
        return pack_ternary(torch.relu(x) if self.positive else x)

    def extra_repr(self) -> str:
        what = "its input" if self.conv is None else "the conv it took in"
        if self.affine is not None:
            what = "its input after the batch norm it took in"
        part = "the positive part of " if self.positive else ""
        return f"{type(self.original).__name__}, packs the signs of {part}{what} as bits for '{self.into}'"


class DirectRealConv(changes.ChangeTracked):
    """A small real conv (an image's first conv) run by bnnslim's kernel, the clamp activation after it taken in.

    ``clamp(conv(x), lo, hi)`` into a new channels-last tensor. The kernel sums
    each output in another order than torch's conv (float rounding differs in
    the last bits); without its AVX2 or AVX-512 tiles (a forced scalar ISA) it
    would be slower than torch, whose conv then runs.
    """

    original: nn.Conv2d  # set with object.__setattr__, as in FusedAway

    def __init__(self, original: nn.Conv2d, lo: float = float("-inf"), hi: float = float("inf")) -> None:
        super().__init__()
        object.__setattr__(self, "original", original)
        weight, bias = _kernel_layout(original)
        self.register_buffer("conv_weight", weight, persistent=False)
        self.register_buffer("conv_bias", bias, persistent=False)
        self.lo, self.hi = lo, hi
        #: the kernel's arguments after weights and bias (built once: forward is on the batch-1 hot path)
        self.conv_geometry = (*original.kernel_size, list(original.stride), list(original.padding))


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = build.available_ops()
        code = build.isa_code() if ops is not None else 0
        if ops is not None and x.dtype == torch.float32 and x.dim() == 4 and x.device.type == "cpu" \
                and not (x.requires_grad and torch.is_grad_enabled()) and build.vector_kernels(code):
            return ops.conv_small_float(x, self.conv_weight, self.conv_bias, *self.conv_geometry, code,
                                        self.original.out_channels, self.lo, self.hi)
        return torch.clamp(self.original(x), self.lo, self.hi)

    def extra_repr(self) -> str:
        o = self.original
        clamp = "" if (self.lo, self.hi) == (float("-inf"), float("inf")) else f", then clamp to [{self.lo}, {self.hi}]"
        return (f"{o.in_channels}, {o.out_channels}, kernel_size={o.kernel_size}, stride={o.stride}, "
                f"padding={o.padding}{clamp}, on the small-conv kernel")


def compute_small_real_convs(model: nn.Module, graph: fx.Graph, calls: Counter[int], report: FusionReport) -> None:
    """Real convs within :data:`SMALL_CONV_MAX_MACS` not taken by a :class:`PackSigns` become
    :class:`DirectRealConv` s, each with the clamp activation that alone takes its output (past a batch norm
    folded into its weights)."""
    for node in graph.nodes:
        conv = model.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not _small_conv(conv, SMALL_CONV_MAX_MACS) or calls[id(conv)] != 1:
            continue
        assert isinstance(conv, nn.Conv2d)
        name = str(node.target)
        lo, hi = float("-inf"), float("inf")
        nxt = _only_user(node)
        while nxt is not None and isinstance(model.get_submodule(str(nxt.target)), FoldedAway):
            nxt = _only_user(nxt)
        act = None if nxt is None else model.get_submodule(str(nxt.target))
        if act is not None and type(act) in CLAMPS and calls[id(act)] == 1:
            assert nxt is not None
            lo, hi = CLAMPS[type(act)](act)
            _set_submodule(model, str(nxt.target), FoldedAway(act, name, "the clamp of"))
            report.folded.setdefault(name, []).append(str(nxt.target))
        _set_submodule(model, name, DirectRealConv(conv, lo, hi))


def reads_inputs_in_any_layout(model: nn.Module, graph: fx.Graph | None) -> bool:
    """Whether every layer of ``model`` (fused, traced as ``graph``) that reads its inputs runs the small-conv
    kernel on them: a :class:`PackSigns` computing an image's first conv (through its
    :class:`ComputedByPackSigns`) or a :class:`DirectRealConv`. That kernel copies its input into padded planar
    rows from any memory format (fastest from NCHW), so converting the inputs to channels-last first would only
    cost a copy (3-4 us of a 140 us batch-1 VGG-11, plus the module hook that does it)."""
    if graph is None:
        return False
    modules = dict(model.named_modules(remove_duplicate=False))
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    return bool(inputs) and all(
        user.op == "call_module" and isinstance(modules.get(str(user.target)), (ComputedByPackSigns, DirectRealConv))
        for node in inputs for user in node.users)


class ComputedByPackSigns(nn.Module):
    """A real conv that the :class:`PackSigns` after it computes: passes the conv's input on to it."""

    original: nn.Module  # set with object.__setattr__, as in FusedAway

    def __init__(self, original: nn.Conv2d, into: str) -> None:
        super().__init__()
        self.into = into
        object.__setattr__(self, "original", original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__} computed by the sign packing of '{self.into}'s input"


def _small_conv(m: object, max_macs: int) -> bool:
    """Whether ``m`` is a real conv the small-conv kernel computes: few inputs, at most ``max_macs``
    multiply-adds per output pixel, groups 1, no dilation, zero padding, float32 on the CPU."""
    return (type(m) is nn.Conv2d and m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str) and m.in_channels <= SIGN_CONV_MAX_INPUTS
            and m.weight[0].numel() * m.out_channels <= max_macs
            and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu")


def _sign_conv(node: fx.Node, model: nn.Module, calls: Counter[int]) -> nn.Conv2d | None:
    """The real conv called at ``node`` if only the :class:`PackSigns` reads it and can compute it too."""
    conv = model.get_submodule(str(node.target)) if node.op == "call_module" else None
    if not _small_conv(conv, SIGN_CONV_MAX_MACS) or calls[id(conv)] != 1 or _only_user(node) is None:
        return None
    assert isinstance(conv, nn.Conv2d)
    return conv


def _positive_part(m: nn.Module) -> bool:
    """Whether sign(m(x)) == sign(relu(x)) for every finite x: ReLU, ReLU6, Hardtanh(0, max > 0) (exact types)."""
    if type(m) is nn.Hardtanh:
        return m.min_val == 0 < m.max_val
    return type(m) in (nn.ReLU, nn.ReLU6)


def _sign_keeping(m: nn.Module) -> bool:
    """Whether sign(m(x)) == sign(x) for every finite x (exact types: a subclass may differ)."""
    if type(m) is nn.Hardtanh:
        return m.min_val < 0 < m.max_val
    if type(m) in (nn.Dropout, nn.Dropout2d):
        return not m.training
    return type(m) in (nn.Identity, FoldedAway)


class PackedMaxPool2d(changes.ChangeTracked):
    """Max pooling of packed ternary bits (OR of sign bits); exact as torch's max pool on the values."""

    def __init__(self, pool: nn.MaxPool2d, channels: int) -> None:
        super().__init__()

        def pair(v: int | tuple[int, ...]) -> tuple[int, int]:
            return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))

        self.channels = channels
        self.kernel_size = pair(pool.kernel_size)
        self.stride = pair(pool.stride if pool.stride is not None else pool.kernel_size)
        self.padding = pair(pool.padding)
        self.dilation = pair(pool.dilation)
        self.ceil_mode = bool(pool.ceil_mode)
        self.mode = "kernel"
        #: the kernel's arguments after the input (built once: forward is on the batch-1 hot path)
        self.pool_geometry = (list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation),
                              self.ceil_mode)


    def use_emulation(self, reason: str) -> None:
        """Pool through torch (unpack, max_pool2d, pack) from now on."""
        self.mode = "emulation"
        self.reason = reason

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = build.available_ops() if self.mode == "kernel" else None
        if ops is not None:
            return ops.bits_max_pool2d(x, *self.pool_geometry)
        return max_pool_emulated(x, self.channels, self.kernel_size, self.stride, self.padding, self.dilation,
                                 self.ceil_mode)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"ceil_mode={self.ceil_mode}, on packed bits")


@dataclass
class FusionReport:
    """Which binary convs hand bits to which, and why other chains were not fused."""

    fused: dict[str, str]      # producer -> consumer (the first, where there are several)
    not_fused: dict[str, str]  # producer -> reason
    folded: dict[str, list[str]] = field(default_factory=dict)  # producer -> layers folded into its epilogue
    packed_inputs: dict[str, list[str]] = field(default_factory=dict)  # consumer -> layers its input bits skip
    fused_also: dict[str, list[str]] = field(default_factory=dict)  # producer -> its other consumers
    graph: fx.Graph | None = field(default=None, repr=False, compare=False)  # the traced model, for later passes

    @property
    def traced(self) -> bool:
        """Whether torch.fx traced the model (with the kernels available): without that nothing is fused."""
        return self.graph is not None


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from bnnslim.binary.layers import BinaryConv2d

        return isinstance(m, (PackedBinaryConv2d, BinaryConv2d)) or super().is_leaf_module(m, qualname)


def _monotone(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``t`` ``[O, L]``: (non-decreasing, non-increasing)."""
    d = torch.diff(t, dim=1)
    return (d >= 0).all(dim=1), (d <= 0).all(dim=1)


def _thresholds(table: torch.Tensor, dots: torch.Tensor) -> torch.Tensor | None:
    """Integer thresholds ``[O, 3]`` reproducing ``table`` (``[O, L]`` in {-1, 0, 1} over ``dots``), or None."""
    up, down = _monotone(table)
    if not bool((up | down).all()):
        return None
    big = int(dots[-1]) + 1

    def first(mask: torch.Tensor) -> int:
        """The first dot product where ``mask`` holds, or one past the last."""
        return int(dots[mask.nonzero()[0, 0]]) if bool(mask.any()) else big

    rows = []
    for o in range(table.shape[0]):
        row = table[o]
        flip = bool(down[o]) and not bool(up[o])
        if flip:
            rows.append((first(row <= 0), first(row == -1), 1))
        else:
            rows.append((first(row >= 0), first(row == 1), 0))
    thr = torch.tensor(rows, dtype=torch.int32)
    if not torch.equal(thresholds_ternary(dots.view(1, -1).expand(table.shape[0], -1), thr), table):
        return None
    return thr


def chain_thresholds(producer: PackedBinaryConv2d, before: list[nn.Module], pooled: bool,
                     after: list[nn.Module], consumer: PackedBinaryConv2d) -> tuple[torch.Tensor | None, str]:
    """Thresholds giving the consumer's input signs from the producer's dot products, or (None, why not)."""
    kh, kw = producer.kernel_size
    k = producer.in_channels // producer.groups * kh * kw
    dots = torch.arange(-k, k + 1, dtype=torch.int64)
    out = producer.out_channels
    # every dot product for every channel, channels-last as the model runs (the same vector/tail code paths)
    y = dots.to(torch.float32).view(1, 1, 1, -1).expand(1, out, 1, dots.numel())
    y = y.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        if producer.alpha is not None:
            y = y * producer.alpha.view(1, -1, 1, 1)
        if producer.bias is not None:
            y = y + producer.bias.view(1, -1, 1, 1)
        for m in before:
            y = m(y)
        g = y.reshape(out, -1).clone()
        for m in after:
            y = m(y)
    v = y.reshape(out, -1)
    table = torch.sign(torch.nan_to_num(v, nan=0.0)).to(torch.int64)
    if consumer.input_mask is not None:
        table = table * consumer.input_mask.view(-1, 1).to(torch.int64)
    if pooled:
        g_up, g_down = _monotone(g)
        t_up, t_down = _monotone(table)
        if not bool(((g_up & t_up) | (g_down & t_down)).all()):
            return None, "max pooling does not commute with the signs (a layer before it is not monotone per channel)"
    thr = _thresholds(table, dots)
    if thr is None:
        return None, "the layers between are not monotone per channel (no integer thresholds)"
    return thr, ""


def _elementwise(m: nn.Module) -> bool:
    if type(m) not in ELEMENTWISE:
        return False
    if isinstance(m, nn.BatchNorm2d):
        return not m.training and m.running_mean is not None and m.running_var is not None
    return not m.training or not isinstance(m, (nn.Dropout, nn.Dropout2d))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


#: (elementwise layers before and after the max pooling, the pooling, the consumers)
Chain = tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]], tuple[str, nn.MaxPool2d] | None,
              list[tuple[str, PackedBinaryConv2d]]]


def _walk_chain(node: fx.Node, modules: dict[str, nn.Module], calls: Counter[int]) -> Chain | str:
    """From a packed conv's node to the packed convs that read its output: (elementwise layers before and after
    the max pooling, the pooling, the consumers), or why there is no such chain.

    The way is one layer at a time, each taking the output alone; at its end one
    packed conv, or several that all take the same output alone (an Inception or
    SqueezeNet branch point: they read the same bits).
    """
    before: list[tuple[str, nn.Module]] = []
    after: list[tuple[str, nn.Module]] = []
    pool: tuple[str, nn.MaxPool2d] | None = None
    cur = node
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if nxt.op != "call_module" or nxt.args != (cur,) or nxt.kwargs:
            return f"'{nxt.name}' is not a layer called on the output alone"
        m = modules[str(nxt.target)]
        stateless = next(iter(m.parameters()), None) is None and next(iter(m.buffers()), None) is None
        if calls[id(m)] != 1 and not (stateless and _elementwise(m)):
            return f"'{nxt.target}' is called more than once"
        if isinstance(m, PackedBinaryConv2d):
            return before, after, pool, [(str(nxt.target), m)]
        if _elementwise(m):
            (after if pool else before).append((str(nxt.target), m))
        elif type(m) is nn.MaxPool2d and pool is None and not m.return_indices:
            pool = (str(nxt.target), m)
        else:
            return f"'{nxt.target}' ({type(m).__name__}) needs real values"
        cur = nxt
    users = list(cur.users)
    consumers: list[tuple[str, PackedBinaryConv2d]] = []
    for u in users:
        user = modules.get(str(u.target)) if u.op == "call_module" else None
        if isinstance(user, PackedBinaryConv2d) and u.args == (cur,) and not u.kwargs and calls[id(user)] == 1:
            consumers.append((str(u.target), user))
    if len(users) < 2 or len(consumers) != len(users):
        return "its output is used by more than one layer or by a non-binary layer"
    return before, after, pool, consumers


def _consumer_problem(cname: str, cons: PackedBinaryConv2d, producer: PackedBinaryConv2d | None = None) -> str | None:
    """Why ``cons`` cannot read packed bits (from ``producer``, or from a :class:`PackSigns`), or None."""
    if cons.mode != "kernel" or (producer is not None and producer.mode != "kernel"):
        return "a layer of the chain runs the torch emulation"
    if cons.padding_mode != "zeros":
        return f"'{cname}' pads with '{cons.padding_mode}' (needs real values)"
    if cons.groups > 1 and (cons.in_channels // cons.groups) % 64:
        return f"'{cname}' has groups of {cons.in_channels // cons.groups} channels (not 64k)"
    if producer is not None and cons.in_channels != producer.out_channels:
        return "channel counts differ along the chain"
    return None


def fuse_binary_chains(model: nn.Module, *, channels_last: bool = True) -> FusionReport:
    """Fuse every eligible chain of ``model`` (a runtime model, in eval mode) in place (module docstring).

    ``channels_last`` says the model runs channels-last (``to_runtime``'s default):
    only then are real activations packed by :class:`PackSigns`, which reads
    channels-last floats (torch's conversion of an NCHW tensor costs more than
    the layers it would skip).
    """
    report = FusionReport({}, {})
    if not build.kernel_status().available:
        return report  # the torch emulation of bits is slower than floats: fuse only on the kernels
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # any tracing failure: run unfused
        for name, m in model.named_modules():
            if isinstance(m, PackedBinaryConv2d):
                report.not_fused[name] = f"torch.fx cannot trace the model ({type(exc).__name__})"
        return report
    report.graph = graph
    modules = dict(model.named_modules(remove_duplicate=False))
    calls = Counter(id(modules[n.target]) for n in graph.nodes if n.op == "call_module")
    plans = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], PackedBinaryConv2d):
            continue
        name, producer = str(node.target), modules[node.target]
        if calls[id(producer)] != 1:
            report.not_fused[name] = "the layer is called more than once"
            continue
        chain = _walk_chain(node, modules, calls)
        if isinstance(chain, str):
            report.not_fused[name] = chain
            continue
        before, after, pool, consumers = chain
        problems = [p for cname, cons in consumers if (p := _consumer_problem(cname, cons, producer))]
        if problems:
            report.not_fused[name] = problems[0]
            continue
        found = [chain_thresholds(producer, [m for _, m in before], pool is not None, [m for _, m in after], cons)
                 for _, cons in consumers]
        thr, reason = found[0]
        if thr is None:
            report.not_fused[name] = reason
            continue
        if any(t is None or not torch.equal(t, thr) for t, _ in found[1:]):
            report.not_fused[name] = "its binary consumers mask different inputs"
            continue
        plans.append((name, producer, before + after, pool, consumers, thr))
    for name, producer, elementwise, pool, consumers, thr in plans:
        producer.out_thresholds = thr
        producer.fused_into = consumers[0][0]
        producer.fused_also = [cname for cname, _ in consumers[1:]]
        for _, cons in consumers:
            cons.input_bits = True
        for ename, m in elementwise:
            _set_submodule(model, ename, FusedAway(m, name))
        if pool is not None:
            _set_submodule(model, pool[0], PackedMaxPool2d(pool[1], producer.out_channels))
        # what unfuse() puts back
        producer.fused_chain = [*elementwise, *([pool] if pool is not None else [])]
        report.fused[name] = consumers[0][0]
        if consumers[1:]:
            report.fused_also[name] = producer.fused_also
    for name, reason in report.not_fused.items():
        modules[name].fuse_reason = reason  # shown by runtime_plan
    fold_float_tails(model, graph, modules, calls, report)
    fold_real_conv_batch_norms(model, graph, modules, calls, report)
    if channels_last:
        pack_sign_chains(model, graph, calls, report)
        compute_small_real_convs(model, graph, calls, report)
    return report


def _only_user(node: fx.Node) -> fx.Node | None:
    """The one module call that takes ``node``'s output alone, or None."""
    if len(node.users) != 1:
        return None
    nxt = next(iter(node.users))
    return nxt if nxt.op == "call_module" and nxt.args == (node,) and not nxt.kwargs else None


def fold_real_conv_batch_norms(model: nn.Module, graph: fx.Graph, modules: dict[str, nn.Module],
                               calls: Counter[int], report: FusionReport) -> None:
    """Fold each eval-mode batch norm that alone takes a real conv's output into the conv's weights and bias.

    ``bn(conv(x)) = conv'(x)`` with ``W' = W s`` and ``b' = b s + t`` per output
    channel (:func:`batch_norm_affine`; float64 math).
    """
    for node in graph.nodes:
        conv = modules[node.target] if node.op == "call_module" else None
        if type(conv) is not nn.Conv2d:
            continue
        assert isinstance(conv, nn.Conv2d)
        bn_node = _only_user(node)
        bn = None if bn_node is None else modules[str(bn_node.target)]
        if (calls[id(conv)] != 1 or not isinstance(bn, nn.BatchNorm2d) or calls[id(bn)] != 1
                or not _elementwise(bn) or bn.num_features != conv.out_channels):
            continue
        assert bn_node is not None
        s, t = batch_norm_affine(bn)
        w = conv.weight.detach()
        with torch.no_grad():
            conv.weight.copy_((w.double() * s.view(-1, 1, 1, 1)).to(w.dtype))
            b = t if conv.bias is None else conv.bias.detach().double() * s + t
            conv.bias = nn.Parameter(b.to(w.dtype), requires_grad=False)
        _set_submodule(model, str(bn_node.target), FoldedAway(bn, str(node.target), "the weights of"))
        report.folded[str(node.target)] = [str(bn_node.target)]


def pack_sign_chains(model: nn.Module, graph: fx.Graph, calls: Counter[int], report: FusionReport) -> None:
    """Real activations that reach a packed conv through sign-keeping layers and a max pooling: pack them once."""
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        consumer = model.get_submodule(str(node.target))
        if (not isinstance(consumer, PackedBinaryConv2d) or consumer.input_bits
                or _consumer_problem(str(node.target), consumer) is not None):
            continue
        chain: list[fx.Node] = []
        pooled = False
        cur = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        while isinstance(cur, fx.Node) and cur.op == "call_module" and _only_user(cur) is not None:
            m = model.get_submodule(str(cur.target))
            stateless = next(iter(m.parameters()), None) is None and next(iter(m.buffers()), None) is None
            if calls[id(m)] != 1 and (not stateless or type(m) is nn.MaxPool2d):
                break  # a shared max pooling would pool bits at its other call too
            if type(m) is nn.MaxPool2d and not m.return_indices and not pooled:
                pooled = True
            elif not (_sign_keeping(m) or _positive_part(m)):
                break
            chain.insert(0, cur)
            cur = cur.args[0] if len(cur.args) == 1 and not cur.kwargs else None
        while chain and type(model.get_submodule(str(chain[0].target))) is nn.MaxPool2d:
            chain.pop(0)  # the chain starts with the layer that packs: a sign-keeping or ReLU-like one
        if not chain:
            continue
        first = model.get_submodule(str(chain[0].target))
        if calls[id(first.original if isinstance(first, FoldedAway) else first)] != 1:
            continue  # PackSigns replaces it at every call
        name = str(node.target)
        chained = [(str(n.target), model.get_submodule(str(n.target))) for n in chain]
        source = chain[0].args[0]
        batch_norm = _sign_batch_norm(source, model, calls) if isinstance(source, fx.Node) else None
        conv = _sign_conv(source, model, calls) if isinstance(source, fx.Node) and batch_norm is None else None
        # relu commutes with max pooling and sign-keeping layers: the whole chain is relu's signs if one is a relu
        positive = any(_positive_part(m) for _, m in chained)
        _set_submodule(model, chained[0][0], PackSigns(chained[0][1], name, conv, positive, batch_norm))
        for lname, m in chained[1:]:
            if type(m) is nn.MaxPool2d:
                _set_submodule(model, lname, PackedMaxPool2d(m, consumer.in_channels))
            else:
                _set_submodule(model, lname, FusedAway(m, name))
        originals = list(chained)
        if batch_norm is not None:
            assert isinstance(source, fx.Node)
            _set_submodule(model, str(source.target), FoldedAway(batch_norm, name, "the sign packing of"))
            originals.insert(0, (str(source.target), batch_norm))
        if conv is not None:
            assert isinstance(source, fx.Node)
            _set_submodule(model, str(source.target), ComputedByPackSigns(conv, name))
            originals.insert(0, (str(source.target), conv))
        consumer.input_bits = True
        consumer.packed_chain = originals  # what unfuse() puts back
        report.packed_inputs[name] = [lname for lname, _ in originals]


def _sign_batch_norm(node: fx.Node, model: nn.Module, calls: Counter[int]) -> nn.BatchNorm2d | None:
    """The eval-mode batch norm called at ``node`` if only the :class:`PackSigns` after it reads it (once)."""
    bn = model.get_submodule(str(node.target)) if node.op == "call_module" else None
    if isinstance(bn, nn.BatchNorm2d) and _elementwise(bn) and calls[id(bn)] == 1 and _only_user(node) is not None:
        return bn
    return None


def batch_norm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode batch norm as ``y = x s + t`` per channel, float64: ``s = weight / sqrt(var + eps)``,
    ``t = bias - mean s`` (weight 1 and bias 0 without affine)."""
    assert bn.running_mean is not None and bn.running_var is not None
    s = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    t = -bn.running_mean.detach().double() * s
    if bn.bias is not None:
        t = t + bn.bias.detach().double()
    return s, t


def fold_batch_norm(layer: PackedBinaryConv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode batch norm into ``layer``'s epilogue scale and shift (float64 math, stored float32).

    ``bn(dot * a + b) = dot * (a s) + (b s + t)``, ``(s, t)`` from :func:`batch_norm_affine`.
    """
    s, t = batch_norm_affine(bn)
    alpha = s if layer.alpha is None else layer.alpha.double() * s
    bias = t if layer.bias is None else layer.bias.double() * s + t
    layer.epilogue_scale = alpha.float()
    layer.epilogue_shift = bias.float()


#: activations called as functions that a float epilogue can also apply, as (lo, hi) from the call's arguments;
#: the call itself stays in the forward (on values already clamped it changes nothing)
FUNCTIONAL_CLAMPS: dict[object, Callable[[fx.Node], tuple[float, float] | None]] = {
    F.relu: lambda n: (0.0, float("inf")),
    torch.relu: lambda n: (0.0, float("inf")),
    F.relu6: lambda n: (0.0, 6.0),
    F.hardtanh: lambda n: _hardtanh_bounds(n),
}


def _hardtanh_bounds(node: fx.Node) -> tuple[float, float] | None:
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    return (float(lo), float(hi)) if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) else None


def functional_clamp(node: fx.Node | None) -> tuple[float, float] | None:
    """(lo, hi) if ``node`` is ``F.relu(x)``, ``torch.relu(x)``, ``F.relu6(x)`` or ``F.hardtanh(x, lo, hi)``
    (in place or not) with constant bounds, else None."""
    if node is None or node.op != "call_function" or node.target not in FUNCTIONAL_CLAMPS or not node.args:
        return None
    return FUNCTIONAL_CLAMPS[node.target](node)


def fold_float_tails(model: nn.Module, graph: fx.Graph, modules: dict[str, nn.Module], calls: Counter[int],
                     report: FusionReport) -> None:
    """Fold a batch norm and/or a clamp activation after packed convs with float outputs (module docstring).

    A clamp activation called as a function (``F.relu(x)`` in a forward) cannot
    be taken out of the forward: the epilogue applies it too and the call, on
    values already clamped, changes nothing (a planned block skips it).
    """

    def only_user(node: fx.Node, kinds: tuple[type[nn.Module], ...]) -> fx.Node | None:
        nxt = _only_user(node)
        m = None if nxt is None else modules[str(nxt.target)]
        return nxt if m is not None and type(m) in kinds and calls[id(m)] == 1 else None

    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], PackedBinaryConv2d):
            continue
        name, layer = str(node.target), modules[node.target]
        if layer.out_thresholds is not None or calls[id(layer)] != 1:
            continue
        folded: list[str] = []
        last = node
        bn_node = only_user(node, (nn.BatchNorm2d,))
        bn = None if bn_node is None else modules[str(bn_node.target)]
        if isinstance(bn, nn.BatchNorm2d) and _elementwise(bn) and bn.num_features == layer.out_channels:
            assert bn_node is not None
            fold_batch_norm(layer, bn)
            folded.append(str(bn_node.target))
            _set_submodule(model, str(bn_node.target), FoldedAway(bn, name))
            last = bn_node
        act_node = only_user(last, tuple(CLAMPS))
        if act_node is not None:
            act = modules[str(act_node.target)]
            lo, hi = CLAMPS[type(act)](act)
            layer.out_clamp = torch.tensor([lo, hi], dtype=torch.float32)
            folded.append(str(act_node.target))
            _set_submodule(model, str(act_node.target), FoldedAway(act, name))
        elif len(last.users) == 1:
            user = next(iter(last.users))
            bounds = functional_clamp(user)
            if bounds is not None and user.args[0] is last:
                layer.out_clamp = torch.tensor(list(bounds), dtype=torch.float32)
        if folded:
            report.folded[name] = folded


def unfuse(model: nn.Module, producer_name: str, reason: str) -> None:
    """Undo one fused pair: the producer writes floats, its chain's layers come back, the consumer reads floats."""
    producer = model.get_submodule(producer_name)
    if not isinstance(producer, PackedBinaryConv2d) or producer.fused_into is None:
        return
    for name, original in getattr(producer, "fused_chain", []):
        _set_submodule(model, name, original)
    for cname in [producer.fused_into, *producer.fused_also]:
        consumer = model.get_submodule(cname)
        assert isinstance(consumer, PackedBinaryConv2d)
        _restore_input(model, consumer)
    producer.fused_also = []
    producer.out_thresholds = None
    producer.fused_into = None
    producer.fused_chain = []
    producer.fuse_reason = reason


def _restore_input(model: nn.Module, consumer: PackedBinaryConv2d) -> None:
    """The consumer reads floats again; layers a PackSigns chain replaced come back."""
    for name, original in consumer.packed_chain:
        _set_submodule(model, name, original)
    consumer.packed_chain = []
    consumer.input_bits = False


def unpack_input(model: nn.Module, consumer_name: str) -> None:
    """Undo a PackSigns chain into ``consumer_name`` (its input comes back as floats)."""
    consumer = model.get_submodule(consumer_name)
    if isinstance(consumer, PackedBinaryConv2d) and consumer.packed_chain:
        _restore_input(model, consumer)
