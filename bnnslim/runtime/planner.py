"""Never slower than float: time each packed binary conv both ways on the shapes it sees, keep the faster.

:func:`plan_runtime` runs a runtime model once on an example input to record
every packed binary conv's input, then times, interleaved, each layer on the
kernels and on its float emulation (a torch float conv of the +-1 weights:
what the layer would cost in float, exact all the same). A layer on float
inputs and outputs whose float version is faster switches to it
(:meth:`PackedBinaryConv2d.use_emulation`, with the times as the reason); a
fused layer that float beats is first unfused (:func:`bnnslim.runtime.fuse.unfuse`:
its neighbours hand it floats again). The float time is the conv alone, so a
fused layer's folded batch norm and activation count in its favour.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bnnslim.runtime.bits import unpack_ternary
from bnnslim.runtime.fuse import unfuse, unpack_input
from bnnslim.runtime.layers import PackedBinaryConv2d


@dataclass
class LayerChoice:
    """One binary conv's measured times and what runs."""

    layer: str
    shape: list[int]           # the input it saw (N, C, H, W)
    packed_ms: float
    float_ms: float
    runs: str                  # "packed" or "float"
    why: str

    @property
    def speedup(self) -> float:
        return self.float_ms / self.packed_ms if self.packed_ms else float("inf")


def _inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, PackedBinaryConv2d):
            handles.append(m.register_forward_pre_hook(
                lambda _m, args, name=name: seen.setdefault(name, args[0].detach().clone())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _median_ms(fns: dict[str, object], calls: int, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # type: ignore[operator]
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            start = time.perf_counter()
            for _ in range(calls):
                fns[k]()  # type: ignore[operator]
            times[k].append((time.perf_counter() - start) / calls * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def float_version(layer: PackedBinaryConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer as a float conv of sign(x) and the +-1 weights, scaled (its exact torch emulation on floats)."""
    t, b, left, r = layer.padding4
    xb = torch.sign(x)
    if layer.input_mask is not None:
        xb = xb * layer.input_mask.view(1, -1, 1, 1)
    if layer.padding_mode != "zeros" or (t, left) != (b, r):
        xb = F.pad(xb, (left, r, t, b), mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
        t = left = 0
    return layer.finish(F.conv2d(xb, layer.weight_signs(), None, layer.stride, (t, left), layer.dilation,
                                 layer.groups))


def plan_runtime(model: nn.Module, x: torch.Tensor, *, calls: int = 5, rounds: int = 7,
                 apply: bool = True) -> list[LayerChoice]:
    """Time every packed binary conv of ``model`` packed and in float on ``x``'s shapes; switch where float wins."""
    seen = _inputs(model, x)
    modules = dict(model.named_modules())
    choices = []
    with torch.no_grad():
        for name, inp in seen.items():
            layer = modules[name]
            assert isinstance(layer, PackedBinaryConv2d)
            as_float = unpack_ternary(inp, layer.in_channels) if inp.dtype == torch.int64 else inp
            if not layer.input_bits:
                inp = as_float  # its producer was unfused above: it reads floats now
            shape = [int(d) for d in as_float.shape]
            if layer.mode != "kernel":
                choices.append(LayerChoice(name, shape, float("nan"), float("nan"), "float",
                                           layer.reason or "emulation chosen"))
                continue
            bits_in, bits_out = layer.input_bits, layer.out_thresholds is not None

            ms = _median_ms({"packed": lambda layer=layer, inp=inp: layer(inp),
                             "float": lambda layer=layer, t=as_float: float_version(layer, t)},
                            calls, rounds)
            packed_ms, float_ms = ms["packed"], ms["float"]
            if (bits_in or bits_out) and float_ms >= packed_ms:
                why = (f"packed {float_ms / packed_ms:.1f}x faster than float, fused (packed bits "
                       + ("in and out" if bits_in and bits_out else "in" if bits_in else "out") + ")")
                runs = "packed"
            elif float_ms < packed_ms:
                if apply and (bits_in or bits_out):
                    # back to floats at both ends: the emulation reads and writes floats
                    why_unfused = f"the plan runs '{name}' in float"
                    if bits_out:
                        unfuse(model, name, why_unfused)
                    for pname, m in modules.items():
                        if isinstance(m, PackedBinaryConv2d) and name in (m.fused_into, *m.fused_also):
                            unfuse(model, pname, why_unfused)
                    unpack_input(model, name)
                why = f"float conv {float_ms:.3f} ms < packed {packed_ms:.3f} ms on input {shape}"
                runs = "float"
                if apply:
                    layer.use_emulation(f"plan: {why}")
            else:
                why = f"packed {float_ms / packed_ms:.1f}x faster than float"
                runs = "packed"
            choices.append(LayerChoice(name, shape, packed_ms, float_ms, runs, why))
    return choices
