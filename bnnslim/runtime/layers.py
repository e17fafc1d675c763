"""``PackedBinaryConv2d``: a binary conv that runs on packed weights.

It is built from the packed export format (:mod:`bnnslim.packing`):
``weight_bits`` uint8 ``[out, kh, kw, ceil(in_per_group / 8)]`` (signs along input
channels, LSB first, set bit = +1), ``alpha`` float32 ``[out]`` or None, ``bias``
``[out]`` or None, and the conv's hyper-parameters. Its forward computes exactly
what :class:`bnnslim.binary.layers.BinaryConv2d` computes,

    y = alpha_o * sum over inputs of sign(x) * sign(W)  +  b_o     (sign(0) = 0)

with the C++ kernels (input signs packed on the fly, XNOR and popcount over
64-bit words, zero padding contributing 0) or, where those are not available or
do not apply, with an exact torch emulation of the same packed weights. Both
give the same numbers bit for bit (``count * alpha + bias`` in float32, mul
then add) and the same memory format (channels-last in, channels-last out).

At construction the export's bytes are laid out once for the kernels
(:func:`kernel_weights`: 64-bit words per tap, 8 output channels innermost).
Depthwise layers (one input channel per group) run the emulation: the kernels
would spend a 64-bit word on one bit, 4-7x slower than a float depthwise conv
here (grouped convs with 2+ channels per group do use the kernels).
Inputs must be finite: a NaN input counts as 0 (torch's sign() would give NaN).

In a fused chain (:mod:`bnnslim.runtime.fuse`) a layer may read packed ternary
bits instead of floats (``input_bits``) and write them through per-channel
integer thresholds (``out_thresholds``), see :mod:`bnnslim.runtime.bits`. After
its first kernel call a layer caches the op and its arguments and calls the
library's pybind11 function directly (a few microseconds per call, which
matters for the small layers of a batch-1 network).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bnnslim.errors import BnnslimError
from bnnslim.packing import BITS, unpack_signs
from bnnslim.runtime import build, changes
from bnnslim.runtime.bits import apply_thresholds, unpack_ternary, words

WORD_BITS = 64
BLOCK = 8  # output channels per weight block of the kernels (NB in _kernels.cpp)

Mode = Literal["kernel", "emulation"]


def _pair(value: int | tuple[int, ...] | list[int], what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) == 2:
        return (int(value[0]), int(value[1]))
    raise BnnslimError(f"{what} {value!r} is not an int or a pair", "conv layers are 2-d")


def padding_4(padding: int | tuple[int, ...] | str, kernel: tuple[int, int],
              dilation: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int, int, int]:
    """Padding as (top, bottom, left, right), as torch applies it (``'same'`` puts the odd pixel last)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise BnnslimError(f"padding '{padding}' is not supported", "use an int, a pair, 'same' or 'valid'")
        if stride != (1, 1):
            raise BnnslimError("padding='same' needs stride 1", "this is torch's rule too")
        pads: list[int] = []
        for k, d in zip(kernel, dilation, strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])
    ph, pw = _pair(padding, "padding")
    return (ph, ph, pw, pw)


def kernel_weights(weight_bits: torch.Tensor, groups: int) -> torch.Tensor:
    """The kernels' weight layout: int64 ``[G, ceil(Og/8), kh, kw, ceil(in_per_group/64), 8]``.

    Each group's bytes are zero-padded to whole 64-bit words (little-endian: byte
    ``j`` holds channels ``8j..8j+7``, as in the export format) and output
    channels come in blocks of 8, zero-padded, innermost.
    """
    out, kh, kw, nbytes = weight_bits.shape
    nwords = math.ceil(nbytes / 8)
    padded = torch.zeros(out, kh, kw, nwords * 8, dtype=torch.uint8)
    padded[..., :nbytes] = weight_bits
    words = padded.view(torch.int64)  # [out, kh, kw, nwords]
    per_group = out // groups
    blocks = math.ceil(per_group / BLOCK)
    grouped = torch.zeros(groups, blocks * BLOCK, kh, kw, nwords, dtype=torch.int64)
    grouped[:, :per_group] = words.view(groups, per_group, kh, kw, nwords)
    return grouped.view(groups, blocks, BLOCK, kh, kw, nwords).permute(0, 1, 3, 4, 5, 2).contiguous()


class PackedBinaryConv2d(changes.ChangeTracked):
    """Inference-only binary conv on packed weights (see the module docstring).

    ``mode`` is ``"kernel"`` (the C++ kernels, when they are built) or
    ``"emulation"`` (torch, exact); ``reason`` says why a layer emulates. Inputs
    that are not float32 on the CPU, or that require a gradient, use the
    emulation for that call.
    """

    weight_bits: torch.Tensor
    alpha: torch.Tensor | None
    bias: torch.Tensor | None
    input_mask: torch.Tensor | None
    kernel_words: torch.Tensor
    out_thresholds: torch.Tensor | None
    out_clamp: torch.Tensor | None
    epilogue_scale: torch.Tensor | None
    epilogue_shift: torch.Tensor | None

    def __init__(
        self,
        weight_bits: torch.Tensor,
        in_channels: int,
        *,
        alpha: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        input_mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if weight_bits.dtype != torch.uint8 or weight_bits.dim() != 4:
            raise BnnslimError(
                f"packed weights must be uint8 [out, kh, kw, in/8], got {weight_bits.dtype} {list(weight_bits.shape)}",
                "the file is not a bnnslim packed export, or is corrupted")
        out, kh, kw, nbytes = (int(s) for s in weight_bits.shape)
        if groups < 1 or in_channels % groups or out % groups:
            raise BnnslimError(f"{in_channels} inputs and {out} outputs do not split into {groups} groups",
                               "the layer's hyper-parameters do not match its weights")
        if nbytes != math.ceil(in_channels // groups / BITS):
            raise BnnslimError(
                f"packed weights hold {nbytes} bytes per tap, {in_channels // groups} inputs per group need "
                f"{math.ceil(in_channels // groups / BITS)}", "the file is corrupted or from another bnnslim version")
        for name, t in (("alpha", alpha), ("bias", bias)):
            if t is not None and t.numel() != out:
                raise BnnslimError(f"{name} has {t.numel()} values for {out} filters", "the file is corrupted")
            if t is not None and not bool(torch.isfinite(t).all()):
                raise BnnslimError(f"{name} holds NaN or infinite values", "the file is corrupted")
        if input_mask is not None and input_mask.numel() != in_channels:
            raise BnnslimError(f"input mask has {input_mask.numel()} values for {in_channels} inputs",
                               "the layer's mask does not match its weights")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise BnnslimError(f"padding_mode '{padding_mode}' is not supported", "use one of torch's modes")
        self.in_channels = in_channels
        self.out_channels = out
        self.kernel_size = (kh, kw)
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        self.groups = groups
        self.padding_mode = padding_mode
        self.padding = padding
        self.padding4 = padding_4(padding, self.kernel_size, self.dilation, self.stride)
        self.register_buffer("weight_bits", weight_bits.detach().cpu().contiguous())
        self.register_buffer("alpha", None if alpha is None else alpha.detach().float().flatten().cpu())
        self.register_buffer("bias", None if bias is None else bias.detach().float().flatten().cpu())
        self.register_buffer("input_mask", None if input_mask is None else input_mask.detach().bool().flatten().cpu())
        self.register_buffer("kernel_words", kernel_weights(self.weight_bits, groups), persistent=False)
        self._signs: torch.Tensor | None = None  # float {-1, +1} weights, made on first emulation
        self.mode: Mode = "kernel"
        self.reason: str | None = None
        # Fusion (bnnslim.runtime.fuse): with thresholds the layer writes packed
        # ternary bits (bnnslim.runtime.bits) instead of floats; with input_bits
        # it reads them. fused_into names the consumer, for the plan.
        self.register_buffer("out_thresholds", None)
        # A batch norm after a float output is folded into the epilogue's scale
        # and shift (alpha and bias stay the file's), a Hardtanh / ReLU after it
        # into out_clamp [lo, hi] (fuse.fold_float_tails).
        self.register_buffer("epilogue_scale", None, persistent=False)
        self.register_buffer("epilogue_shift", None, persistent=False)
        self.register_buffer("out_clamp", None, persistent=False)
        self.packed_chain: list[tuple[str, nn.Module]] = []  # layers a PackSigns chain replaced (fuse.py)
        self.input_bits = False
        self.fused_into: str | None = None
        self.fused_also: list[str] = []  # further consumers of the same bits (a branch point)
        self._fast: tuple[object, ...] | None = None  # see _make_fast
        if in_channels // groups == 1 and groups > 1:
            # one input bit per 64-bit word: the kernel would spend 64x the work
            # of a float depthwise conv, which is cheap already
            self.use_emulation("depthwise: a float depthwise conv is cheaper than one bit per popcount word")

    # -------------------------------------------------------------- construction

    @classmethod
    def from_binary_conv(cls, layer: nn.Conv2d, weight_bits: torch.Tensor | None = None,
                         alpha: torch.Tensor | None = None) -> PackedBinaryConv2d:
        """Pack a :class:`~bnnslim.binary.layers.BinaryConv2d`.

        By default the signs and the scale come from the layer's scheme (the scale
        over kept inputs, as its forward uses it). With ``weight_bits`` (and
        ``alpha``, None for a scheme without scale) they come from a packed file
        instead, as they are: only their shapes are checked against the layer.
        """
        from bnnslim.binary.layers import BinaryConv2d
        from bnnslim.packing import pack_signs

        if not isinstance(layer, BinaryConv2d):
            raise BnnslimError(f"{type(layer).__name__} is not a BinaryConv2d", "binarize the model first")
        if weight_bits is None:
            with torch.no_grad():
                signs = layer.scheme.binarize_weight(layer.weight.detach()).float().cpu()
                if not bool(((signs == 1) | (signs == -1)).all()):
                    raise BnnslimError(f"scheme '{layer.scheme.name}' gives weights other than -1 and +1",
                                       "only 1-bit weights pack")
                scale = layer.scheme.scale(layer.weight.detach(), layer.kept_weight_inputs())
            weight_bits = pack_signs(signs)
            alpha = None if scale is None else scale.flatten()
        else:
            kh, kw = layer.kernel_size
            want = (layer.out_channels, kh, kw, math.ceil(layer.in_channels // layer.groups / BITS))
            if tuple(weight_bits.shape) != want:
                raise BnnslimError(f"packed weights of shape {tuple(weight_bits.shape)} for a layer that needs {want}",
                                   "the file is corrupted or from another bnnslim version: export it again")
        return cls(
            weight_bits, layer.in_channels, alpha=alpha,
            bias=None if layer.bias is None else layer.bias.detach(),
            stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,  # type: ignore[arg-type]
            padding_mode=layer.padding_mode, input_mask=layer.input_mask,
        )

    def use_emulation(self, reason: str) -> None:
        """Run this layer with the torch emulation from now on, for ``reason``."""
        self.mode = "emulation"
        self.reason = reason

    # -------------------------------------------------------------- forward

    def _kernel_ready(self, x: torch.Tensor) -> bool:
        return (self.mode == "kernel" and x.device.type == "cpu" and x.dtype == (torch.int64 if self.input_bits
                                                                                  else torch.float32)
                and self.kernel_words.device.type == "cpu"
                and not (x.requires_grad and torch.is_grad_enabled()) and build.kernel_status().available)

    def _pad_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        if self.padding_mode == "zeros" or self.padding4 == (0, 0, 0, 0):
            return x, self.padding4
        t, b, left, r = self.padding4
        return F.pad(x, (left, r, t, b), mode=self.padding_mode), (0, 0, 0, 0)

    def epilogue(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scale, shift) of the float output ``dot * scale + shift``: alpha and bias, or with a folded batch norm."""
        if self.epilogue_scale is not None:
            return self.epilogue_scale, self.epilogue_shift
        return self.alpha, self.bias

    def _run_kernel(self, x: torch.Tensor, counts: bool) -> torch.Tensor:
        thresholds = None if counts else self.out_thresholds
        scale, shift = self.epilogue()
        if self.input_bits:
            return build.ops().binary_conv2d_bits(
                x, self.in_channels, self.kernel_words, scale, shift, self.out_channels,
                self.kernel_size[0], self.kernel_size[1], list(self.stride), list(self.padding4),
                list(self.dilation), self.groups, self.input_mask, counts, build.isa_code(), thresholds,
                self.out_clamp)
        x, pad = self._pad_input(x)
        return build.ops().binary_conv2d(
            x, self.kernel_words, scale, shift, self.out_channels, self.kernel_size[0],
            self.kernel_size[1], list(self.stride), list(pad), list(self.dilation), self.groups,
            self.input_mask, counts, build.isa_code(), thresholds, self.out_clamp)

    def weight_signs(self) -> torch.Tensor:
        """The float {-1, +1} weights ``[out, in/groups, kh, kw]`` unpacked from ``weight_bits`` (cached)."""
        if self._signs is None:
            signs = unpack_signs(self.weight_bits, self.in_channels // self.groups)
            # plain NCHW strides: a 1x1 kernel's permuted strides would make torch's
            # conv answer in channels-last, unlike the kernel (and nn.Conv2d) for NCHW inputs
            self._signs = torch.empty(signs.shape, dtype=signs.dtype).copy_(signs)
        return self._signs

    def _emulate_counts(self, x: torch.Tensor) -> torch.Tensor:
        """sum sign(x) * sign(W) per output as float (exact integers below 2^24)."""
        if self.input_bits:
            x = unpack_ternary(x, self.in_channels)
        x, (t, b, left, r) = self._pad_input(x)
        xb = torch.sign(x.detach().float())
        if self.input_mask is not None:
            xb = xb * self.input_mask.to(xb.device, xb.dtype).view(1, -1, 1, 1)
        if (t, left) != (b, r):
            xb = F.pad(xb, (left, r, t, b))
            t = b = left = r = 0
        return F.conv2d(xb, self.weight_signs().to(xb.device), None, self.stride, (t, left), self.dilation, self.groups)

    def emulate(self, x: torch.Tensor) -> torch.Tensor:
        """The torch emulation of this layer (what the fallback runs); same numbers and memory format as the kernel."""
        y = self._emulate_counts(x)
        if self.out_thresholds is not None:
            return apply_thresholds(y.round().to(torch.int64), self.out_thresholds)
        y = self.finish(y)
        return y.to(x.dtype) if x.is_floating_point() else y

    def finish(self, dots: torch.Tensor) -> torch.Tensor:
        """Float dot products -> this layer's float output: ``dots * scale + shift`` (mul then add, as the
        kernels), then the clamp of a folded activation."""
        scale, shift = self.epilogue()
        y = dots
        if scale is not None:
            y = y * scale.to(y.device).view(1, -1, 1, 1)
        if shift is not None:
            y = y + shift.to(y.device).view(1, -1, 1, 1)
        if self.out_clamp is not None:
            y = y.clamp(float(self.out_clamp[0]), float(self.out_clamp[1]))
        return y

    def counts(self, x: torch.Tensor) -> torch.Tensor:
        """The integer dot products ``sum sign(x) * sign(W)``, int32 ``[N, out, OH, OW]``."""
        self._check_input(x)
        if self._kernel_ready(x):
            return self._run_kernel(x, counts=True)
        return self._emulate_counts(x).round().to(torch.int32)

    def _check_input(self, x: torch.Tensor) -> None:
        if self.input_bits:
            if x.dtype != torch.int64 or x.dim() != 5 or x.shape[3] != words(self.in_channels):
                raise BnnslimError(f"fused packed conv expects packed bits [N, H, W, {words(self.in_channels)}, 2], "
                                   f"got {x.dtype} {list(x.shape)}", "call the whole model, not this layer alone")
            return
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise BnnslimError(f"packed conv expects [N, {self.in_channels}, H, W] inputs, got {list(x.shape)}",
                               "the model and its input do not match")

    def _state(self) -> tuple[object, ...]:
        """What the kernel call's arguments depend on (the fast path is rebuilt when it changes)."""
        b = self._buffers
        return (self.mode, self.input_bits, id(b["kernel_words"]), id(b["alpha"]), id(b["bias"]),
                id(b["input_mask"]), id(b["out_thresholds"]), id(b["out_clamp"]),
                id(b["epilogue_scale"]), id(b["epilogue_shift"]), build.env_isa(),
                id(build._status))


    def __getstate__(self) -> dict[str, object]:
        """Copies and pickles leave the fast path out (a C++ object; the copy rebuilds its own on first call)."""
        state = dict(self.__dict__)
        state["_fast"] = None
        return state

    def _make_fast(self) -> None:
        """Hold the kernel call's arguments (all but the input) in a C++ object, to cut the per-call cost."""
        scale, shift = self.epilogue()
        call = build.fast_ops().PackedConvCall(
            self.input_bits, self.in_channels, self.kernel_words, scale, shift, self.out_channels,
            self.kernel_size[0], self.kernel_size[1], list(self.stride), list(self.padding4), list(self.dilation),
            self.groups, self.input_mask, build.isa_code(), self.out_thresholds, self.out_clamp)
        if self.input_bits:
            key = (torch.int64, 5, 3, words(self.in_channels))
        else:
            key = (torch.float32, 4, 1, self.in_channels)
        self._fast = (self._state(), key, call)

    def kernel_call(self) -> Any:
        """The C++ object that runs this layer's kernel on its input alone (for callers that know the input is
        what the layer expects: packed bits from the layer before), or None until a call has made it."""
        fast = self.__dict__.get("_fast")
        return None if fast is None or fast[0] != self._state() else fast[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.__dict__.get("_fast")
        if fast is not None and not (x.requires_grad and torch.is_grad_enabled()) and x.device.type == "cpu":
            state, (dtype, dim, axis, size), call = fast
            if x.dtype == dtype and x.dim() == dim and x.shape[axis] == size and state == self._state():
                return call(x)
        self._check_input(x)
        if self._kernel_ready(x):
            if self.padding_mode == "zeros" or self.padding4 == (0, 0, 0, 0):
                self._make_fast()
            return self._run_kernel(x, counts=False)
        return self.emulate(x)

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw})", f"stride={self.stride}",
                 f"padding={self.padding}"]
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        parts += [f"alpha={self.alpha is not None}", f"bias={self.bias is not None}", f"mode={self.mode}"]
        if self.input_bits:
            parts.append("input=bits")
        if self.fused_into is not None:
            parts.append("output=bits for " + ", ".join(f"'{c}'" for c in [self.fused_into, *self.fused_also]))
        return ", ".join(parts)
