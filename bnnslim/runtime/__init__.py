"""bnnslim's binary runtime: XNOR-popcount convolution on packed weights.

    from bnnslim.runtime import to_runtime, runtime_plan, kernel_status
    fast = to_runtime(binary_model)      # every BinaryConv2d -> PackedBinaryConv2d; chains fused
    y = fast(x)                          # same outputs as binary_model.eval()(x)
    plan_runtime(fast, x)                # time each layer packed vs float; keep the faster

Kernels are compiled on first use (see :mod:`bnnslim.runtime.build`); without a
compiler the layers run an exact torch emulation after one warning.
"""

from __future__ import annotations

from bnnslim.runtime.build import (
    KernelStatus,
    RuntimeFallbackWarning,
    ThreadsWarning,
    available_cores,
    cpu_flags,
    cpu_model,
    kernel_status,
    set_threads,
)
from bnnslim.runtime.convert import RuntimePlan, runtime_plan, to_runtime, with_emulation
from bnnslim.runtime.fuse import FoldedAway, FusedAway, PackedMaxPool2d, PackSigns
from bnnslim.runtime.layers import PackedBinaryConv2d, kernel_weights
from bnnslim.runtime.planner import LayerChoice, plan_runtime

__all__ = [
    "FoldedAway",
    "FusedAway",
    "KernelStatus",
    "LayerChoice",
    "PackSigns",
    "PackedBinaryConv2d",
    "PackedMaxPool2d",
    "RuntimeFallbackWarning",
    "RuntimePlan",
    "ThreadsWarning",
    "available_cores",
    "cpu_flags",
    "cpu_model",
    "kernel_status",
    "kernel_weights",
    "plan_runtime",
    "runtime_plan",
    "set_threads",
    "to_runtime",
    "with_emulation",
]
