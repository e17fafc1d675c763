"""The packed binary runtime: kernels equal the torch emulation exactly, layers and whole models equal BinaryConv2d."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _helpers import EXAMPLES, builtin_scheme
from torch import nn

from bnnslim.binary.convert import apply_binarization, plan_binarization
from bnnslim.binary.layers import BinaryConv2d
from bnnslim.errors import BnnslimError
from bnnslim.packing import pack_signs
from bnnslim.runtime import (
    FoldedAway,
    FusedAway,
    PackedBinaryConv2d,
    PackedMaxPool2d,
    PackSigns,
    RuntimeFallbackWarning,
    ThreadsWarning,
    available_cores,
    build,
    kernel_status,
    runtime_plan,
    set_threads,
    to_runtime,
    with_emulation,
)
from bnnslim.runtime.bits import apply_thresholds
from bnnslim.runtime.changes import generation
from bnnslim.runtime.fuse import ComputedByPackSigns, DirectRealConv, fuse_binary_chains, unfuse, unpack_input

ALL_ISAS = ["avx512", "avx2", "popcnt", "scalar"]


@pytest.fixture(scope="module")
def kernels() -> build.KernelStatus:
    """The built kernels; skipped only where no compiler toolchain exists at all."""
    status = kernel_status()
    if not status.available:
        if shutil.which("c++") is None or shutil.which("ninja") is None:
            pytest.skip(f"no C++ toolchain to build the kernels: {status.reason}")
        pytest.fail(f"the kernels did not build: {status.reason}")
    return status


def cpu_isas() -> list[str]:
    status = kernel_status()
    if not status.available:
        return []
    ops = build.ops()
    return [name for name in ALL_ISAS if bool(ops.cpu_has(build.ISA_CODES[name]))]  # type: ignore[attr-defined]


@pytest.fixture(params=ALL_ISAS)
def isa(request: pytest.FixtureRequest, kernels: build.KernelStatus, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each kernel this CPU can run, forced through BNNSLIM_RUNTIME_ISA."""
    if request.param not in cpu_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernel")
    monkeypatch.setenv(build.ENV_ISA, request.param)
    return str(request.param)


def binary_conv(cin: int, cout: int, k: int, *, stride: int = 1, padding: int | str | tuple[int, int] = 0,
                dilation: int = 1, groups: int = 1, bias: bool = True, scheme: str = "xnor",
                padding_mode: str = "zeros") -> BinaryConv2d:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                     padding_mode=padding_mode)
    return BinaryConv2d.from_conv(conv, builtin_scheme(scheme)).eval()


def reference_counts(layer: BinaryConv2d, x: torch.Tensor) -> torch.Tensor:
    """sum sign(x) * sign(W) computed in float64 by torch: the exact integers."""
    signs = layer.scheme.binarize_weight(layer.weight.detach()).double()
    xb = torch.sign(x.double())
    if layer.input_mask is not None:
        xb = xb * layer.input_mask.double().view(1, -1, 1, 1)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    xb = F.pad(xb, layer._reversed_padding_repeated_twice, mode=mode)  # sign() commutes with every padding mode
    return F.conv2d(xb, signs, None, layer.stride, 0, layer.dilation, layer.groups).round().int()


@contextmanager
def avx2_lut(mode: int) -> Iterator[None]:
    """AVX2's kernel for bits and channels-last outputs within the block: 0 pixel lanes, 2 nibble tables wherever
    they run."""
    ops = build.fast_ops()
    was = ops.set_avx2_lut(mode)
    try:
        yield
    finally:
        ops.set_avx2_lut(was)


def check_layer(layer: BinaryConv2d, x: torch.Tensor, force_kernel: bool = False) -> None:
    packed = PackedBinaryConv2d.from_binary_conv(layer)
    if force_kernel:
        packed.mode = "kernel"
    assert packed._kernel_ready(x)
    counts = packed.counts(x)
    assert counts.dtype == torch.int32
    assert torch.equal(counts, reference_counts(layer, x))
    with torch.no_grad():
        want = layer(x)
    got = packed(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    emulated = packed.emulate(x)
    assert torch.equal(got, emulated), "kernel and emulation must agree bit for bit"
    assert got.stride() == emulated.stride(), "and on the memory format"
    x_cl = x.contiguous(memory_format=torch.channels_last)  # the runtime's format: other output paths
    emulated_cl = packed.emulate(x_cl)
    for mode in (0, 2):  # AVX2 has two kernels for channels-last outputs: nibble tables (mostly) and pixel lanes
        with avx2_lut(mode):
            got_cl = packed(x_cl)
            assert torch.equal(got_cl, emulated_cl) and got_cl.stride() == emulated_cl.stride()
    # a fused layer's bits output: random per-channel thresholds (a, b, flip) near the typical dot products
    g = torch.Generator().manual_seed(0)
    low = torch.randint(-4, 5, (packed.out_channels,), generator=g)
    thresholds = torch.stack([low, low + torch.randint(0, 3, low.shape, generator=g),
                              torch.randint(0, 2, low.shape, generator=g)], dim=1).to(torch.int32)
    packed.out_thresholds = thresholds
    want_bits = apply_thresholds(counts.to(torch.int64), thresholds)
    for mode in (0, 2):
        with avx2_lut(mode):
            assert torch.equal(packed(x_cl), want_bits)


# (cin, cout, k, stride, padding, H, W, batch, bias, scheme): channels off multiples of 64 and 8,
# 1x1 / 3x3 / 5x5, stride 1 and 2, padding 0 / 1 / 2, batch 1 and 3, with and without alpha and bias
SHAPES = [
    (3, 8, 3, 1, 1, 9, 11, 1, True, "xnor"),
    (13, 16, 3, 2, 1, 10, 7, 3, False, "xnor"),
    (64, 64, 3, 1, 1, 8, 8, 1, True, "sign"),
    (64, 24, 1, 1, 0, 7, 9, 3, False, "xnor"),
    (100, 20, 5, 2, 2, 12, 13, 1, True, "xnor"),
    (130, 17, 1, 2, 0, 6, 9, 3, True, "sign"),
    (130, 9, 3, 1, 2, 5, 19, 1, False, "bireal"),
    (70, 33, 5, 1, 0, 9, 9, 3, True, "xnor"),
    (8, 8, 3, 2, 1, 16, 17, 1, False, "sign"),
    (200, 12, 3, 2, 1, 7, 7, 3, True, "xnor"),
    # narrow outputs: the AVX-512 kernel puts output channels in its lanes there
    (64, 24, 3, 1, 1, 4, 4, 2, True, "xnor"),
    (100, 20, 3, 2, 1, 6, 5, 1, False, "sign"),
    # 81 words per output: past AVX-512's short path; AVX2's short path folds its byte counters 3 times
    (520, 12, 3, 1, 1, 5, 6, 1, True, "xnor"),
    # 153 words per output: past AVX2's short path too (its long path)
    (1040, 12, 3, 1, 1, 4, 5, 1, True, "xnor"),
    # outputs narrower than a vector: AVX2's 4-pixel blocks span rows (2x2: one block) and leave out the taps
    # that are padding for all their pixels (a 1x1 output keeps only the centre tap; a single row of 3 pixels
    # keeps 6 of 9 taps, 54 of 81 words, past the byte counters' fold at 31)
    (64, 16, 3, 1, 1, 2, 2, 1, True, "xnor"),
    (256, 16, 3, 1, 1, 1, 1, 3, False, "sign"),
    (520, 12, 3, 1, 1, 1, 3, 2, True, "xnor"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "c{}-o{}-k{}-s{}-p{}-{}x{}-n{}-{}-{}".format(
    *s[:8], "bias" if s[8] else "nobias", s[9]))
def test_layer_matches_binary_conv(shape: tuple[int, int, int, int, int, int, int, int, bool, str], isa: str) -> None:
    cin, cout, k, stride, padding, h, w, n, bias, scheme = shape
    layer = binary_conv(cin, cout, k, stride=stride, padding=padding, bias=bias, scheme=scheme)
    check_layer(layer, torch.randn(n, cin, h, w))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", ["zeros", "mask", "dilation", "same", "asym", "reflect", "circular",
                                  "groups", "depthwise", "channels_last", "channels_last_odd", "strided_view"])
def test_layer_odd_cases(case: str, isa: str) -> None:
    x = torch.randn(2, 72, 11, 10)
    layer = binary_conv(72, 16, 3, padding=1)
    force = False
    if case == "zeros":  # exact zeros contribute 0, like the padding
        x[x.abs() < 0.5] = 0.0
    elif case == "mask":
        layer.input_mask = (torch.rand(72) > 0.3).float()
    elif case == "dilation":
        layer = binary_conv(72, 16, 3, stride=2, padding=2, dilation=2)
    elif case == "same":
        layer = binary_conv(72, 16, 4, padding="same")
    elif case == "asym":
        layer = binary_conv(72, 16, (3, 5), padding=(0, 2))  # type: ignore[arg-type]
    elif case in ("reflect", "circular"):
        layer = binary_conv(72, 16, 3, padding=1, padding_mode=case)
    elif case == "groups":
        layer = binary_conv(72, 16, 3, stride=2, padding=1, groups=4)
    elif case == "depthwise":  # emulated by default; the kernel must be right too
        layer = binary_conv(72, 72, 3, padding=1, groups=72)
        assert PackedBinaryConv2d.from_binary_conv(layer).mode == "emulation"
        force = True
    elif case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "channels_last_odd":  # an output-channel tail and stride 2 on the transposed store
        layer = binary_conv(72, 13, 3, stride=2, padding=1)
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "strided_view":
        x = torch.randn(2, 72, 11, 20)[..., ::2]
    check_layer(layer, x, force_kernel=force)
    if case.startswith("channels_last"):  # like torch's conv, the output keeps the input's memory format
        assert PackedBinaryConv2d.from_binary_conv(layer)(x).is_contiguous(memory_format=torch.channels_last)


# (cin, cout, kernel, stride, padding, dilation, groups, H, W): at most 32 input channels per group, where the
# kernels read two taps of a row from one word (paired taps); odd and even kernel widths, strides 1-3, dilation
# along H only (along W there is no pairing), groups, a mask
PAIRED = [
    (32, 32, 3, 1, 1, 1, 1, 16, 16),
    (32, 64, 3, 2, 1, 1, 1, 15, 17),
    (24, 16, (3, 5), 1, (1, 2), 1, 1, 9, 12),
    (16, 8, 4, 1, 2, 1, 1, 7, 9),
    (20, 12, 2, 3, 0, 1, 1, 11, 13),
    (8, 8, 5, 2, 2, (2, 1), 1, 12, 10),
    (64, 24, 3, 2, 1, 1, 2, 9, 9),
    (30, 10, (1, 3), 1, (0, 1), 1, 1, 6, 20),
]


@pytest.mark.parametrize("shape", PAIRED, ids=lambda s: "c{}-o{}-k{}-s{}-p{}-d{}-g{}-{}x{}".format(*s))
def test_paired_taps_count_exactly(shape: tuple, isa: str) -> None:
    """Layers with at most 32 channels per group (two taps in one 64-bit word): the exact counts, the same as the
    one-tap-per-word path, with and without a channel mask, with every kernel."""
    cin, cout, k, stride, padding, dilation, groups, h, w = shape
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=True)
    layer = BinaryConv2d.from_conv(conv, builtin_scheme("xnor")).eval()
    x = torch.randn(2, cin, h, w)
    check_layer(layer, x)
    layer.input_mask = (torch.rand(cin, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    check_layer(layer, x)
    ops = build.fast_ops()
    packed = PackedBinaryConv2d.from_binary_conv(layer)
    was = ops.set_pair_taps(2)  # paired with every kernel (by default not with AVX-512's)
    try:
        check_layer(layer, x)
        paired = packed.counts(x)
        ops.set_pair_taps(0)
        assert torch.equal(packed.counts(x), paired)
    finally:
        ops.set_pair_taps(was)


# (cin, cout, kernel, stride, padding, groups, H, W): AVX2's nibble-table kernel on thresholded outputs: two
# output words with a half-empty last chunk (80 = 64 + 16), groups of one output word each, byte counters folded
# (5x5 over 48 channels: 300 input nibbles), stride 2, rows narrower than a block of 4 pixels, 16 outputs
LUT_GEOMETRIES = [
    (96, 80, 1, 1, 0, 1, 7, 9),
    (128, 128, 3, 1, 1, 2, 6, 5),
    (48, 96, 5, 2, 2, 1, 9, 11),
    (200, 40, 3, 1, 1, 1, 3, 2),
    (20, 16, 3, 1, 1, 1, 8, 8),
]


@pytest.mark.parametrize("geometry", LUT_GEOMETRIES, ids=lambda g: "c{}-o{}-k{}-s{}-p{}-g{}-{}x{}".format(*g))
@pytest.mark.parametrize("zeros", [False, True], ids=["signs", "ternary"])
def test_avx2_nibble_table_kernel_thresholds_exactly(geometry: tuple, zeros: bool, kernels: build.KernelStatus,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Both AVX2 kernels give a conv's thresholded bits exactly (ternary inputs, a channel mask and padding count
    as zeros), and so do the fused layers a chain runs: the same bits as thresholds on the exact counts."""
    if "avx2" not in cpu_isas():
        pytest.skip("this CPU cannot run the avx2 kernels")
    monkeypatch.setenv(build.ENV_ISA, "avx2")
    cin, cout, k, stride, padding, groups, h, w = geometry
    layer = binary_conv(cin, cout, k, stride=stride, padding=padding, groups=groups)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, cin, h, w, generator=gen)
    if zeros:
        x[torch.rand(x.shape, generator=gen) < 0.2] = 0.0
        layer.input_mask = (torch.rand(cin, generator=gen) > 0.2).float()
    packed = PackedBinaryConv2d.from_binary_conv(layer)
    counts = reference_counts(layer, x).to(torch.int64)
    low = counts.float().mean((0, 2, 3)).round().to(torch.int32)  # thresholds where the counts are
    packed.out_thresholds = torch.stack([low, low + torch.randint(0, 3, low.shape, generator=gen, dtype=torch.int32),
                                         torch.randint(0, 2, low.shape, generator=gen, dtype=torch.int32)], dim=1)
    want = apply_thresholds(counts, packed.out_thresholds)
    assert want[..., 1].any() and (~want[..., 1]).any()  # some outputs fire, some do not
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for mode in (2, 0):
        with avx2_lut(mode):
            assert torch.equal(packed(x_cl), want)


BITS_GEOMETRIES = [  # cin, cout, kernel, stride, padding, groups, masked
    (96, 80, 1, 1, 0, 1, False),  # a 1x1 conv over two words (NIN's), one phase: the strided copy
    (100, 24, 3, 1, 1, 1, True),  # a partial last word, padding, a channel mask
    (64, 40, 3, (2, 1), (2, 1), 1, False),  # stride 2 down only: still one phase across
    (48, 32, 5, 2, 2, 1, True),  # stride 2 across: two phases, the general copy
    (128, 64, 3, 1, 1, 2, False),  # two groups of one word each
]


@pytest.mark.parametrize("geometry", BITS_GEOMETRIES, ids=lambda g: "c{}-o{}-k{}-s{}-p{}-g{}-m{}".format(*g))
def test_a_conv_reading_packed_bits_counts_as_on_their_values(geometry: tuple, isa: str) -> None:
    """A packed conv fed packed bits (a fused chain's input) gives the exact counts it gives on the ternary values
    those bits stand for: padding, strides, partial words, groups and a channel mask, with every kernel."""
    from bnnslim.runtime.bits import pack_ternary

    cin, cout, k, stride, padding, groups, masked = geometry
    layer = binary_conv(cin, cout, k, stride=stride, padding=padding, groups=groups)  # type: ignore[arg-type]
    if masked:
        layer.input_mask = (torch.rand(cin, generator=torch.Generator().manual_seed(2)) > 0.3).float()
    packed = PackedBinaryConv2d.from_binary_conv(layer)
    values = torch.randint(-1, 2, (2, cin, 11, 13), generator=torch.Generator().manual_seed(3)).float()
    want = packed.counts(values)
    assert torch.equal(want, reference_counts(layer, values))
    packed.input_bits = True
    assert torch.equal(packed.counts(pack_ternary(values)), want)


@pytest.mark.slow
def test_the_portable_kernels_compile() -> None:
    """On a CPU that is not x86 (ARM: Graviton, Apple silicon) the kernels build their portable path only: with
    BNN_PORTABLE defined the source must still compile (the x86-only kernels, constants and choices left out)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    done = subprocess.run([compiler, "-fsyntax-only", "-std=c++20", "-DBNN_PORTABLE",
                           "-DTORCH_EXTENSION_NAME=bnnslim_rt_portable", *includes, str(build.SOURCE)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("output", ["floats", "channels_last", "bits"])
def test_threads_give_the_same_result(output: str, isa: str) -> None:
    """Work split over threads gives what one thread gives: NCHW floats, channels-last floats and thresholded
    bits (on AVX2 the last two run the nibble-table kernel)."""
    layer = binary_conv(96, 40, 3, padding=1)
    packed = PackedBinaryConv2d.from_binary_conv(layer)
    x = torch.randn(3, 96, 14, 14)
    if output != "floats":
        x = x.contiguous(memory_format=torch.channels_last)
    if output == "bits":
        packed.out_thresholds = torch.tensor([[-2, 1, i % 2] for i in range(40)], dtype=torch.int32)
    one = packed(x)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(packed(x), one)
    finally:
        torch.set_num_threads(before)


def test_a_runtime_model_in_use_can_be_copied_and_saved(kernels: build.KernelStatus, tmp_path: Path) -> None:
    """After calls (which cache the kernel's arguments in a C++ object) the model still deep-copies and pickles,
    and the copy computes the same; changing the copy's thresholds does not change the original."""
    import copy

    torch.manual_seed(3)
    model = nn.Sequential(binary_conv(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.Hardtanh(),
                          binary_conv(24, 8, 3, padding=1)).eval()
    _random_bn(model, seed=4)
    fused = to_runtime(model)
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        y = fused(x)
        twin = copy.deepcopy(fused)
        assert torch.equal(twin(x), y)
        torch.save(fused, tmp_path / "m.pt")
        assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=False)(x), y)
        twin[0].out_thresholds = torch.zeros_like(twin[0].out_thresholds)
        assert not torch.equal(twin(x), y) and torch.equal(fused(x), y)


def _chain_model() -> nn.Module:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardtanh(), nn.MaxPool2d(2),
                          binary_conv(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Hardtanh(), nn.MaxPool2d(2),
                          binary_conv(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Hardtanh(),
                          binary_conv(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Hardtanh(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    _random_bn(model, seed=6)
    return model


def _module_by_module(model: nn.Module) -> nn.Module:
    from bnnslim.runtime.segments import PackedSequential

    twin = copy.deepcopy(model)
    for m in twin.modules():
        if type(m) is PackedSequential:
            m.__class__ = nn.Sequential
    return twin


def test_a_fused_sequence_calls_its_kernels_directly_and_equals_the_layer_by_layer_run(isa: str) -> None:
    """The runtime's nn.Sequential runs a fused chain's convs and bit poolings without module calls (as one C++
    call) and skips the layers folded or fused away; the output is the layer-by-layer run's, bit for bit, before
    and after changes."""
    from bnnslim.runtime.layers import PackedBinaryConv2d
    from bnnslim.runtime.segments import PackedSequential, plan_steps

    fused = to_runtime(_chain_model())
    assert type(fused) is PackedSequential
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = _module_by_module(fused)(x)
        assert torch.equal(fused(x), want) and torch.equal(fused(x), want)  # the second call runs the plan
        planned = plan_steps(list(fused))
        assert planned is not None
        steps, bypassed = planned
        direct = [m for m in bypassed if isinstance(m, (PackedBinaryConv2d, PackedMaxPool2d))]
        assert [type(m).__name__ for m in direct] == ["PackedMaxPool2d", "PackedBinaryConv2d", "PackedMaxPool2d",
                                                      "PackedBinaryConv2d", "PackedBinaryConv2d"]
        assert len(steps) < len(fused) - 6  # folded norms, fused activations skipped
        # the five steps on packed bits (pool, conv, pool, conv, conv) run as one C++ call
        assert [len(s) for s in steps if type(s) is build.fast_ops().PackedChain] == [5]
        assert torch.equal(fused(x), with_emulation(fused)(x))
        fused(x)  # planned again (the emulated copy's changes count as changes)
        # a change to a layer replans (each run before the copy that the reference makes): new thresholds, then
        # the emulation, then an undone fusion
        fused[8].out_thresholds = fused[8].out_thresholds.flip(0)
        got = fused(x)
        assert torch.equal(got, _module_by_module(fused)(x)) and not torch.equal(got, want)
        fused[11].use_emulation("test")
        got = fused(x)
        assert torch.equal(got, _module_by_module(fused)(x))
        unfuse(fused, "8", "test")
        got = fused(x)
        assert torch.equal(got, _module_by_module(fused)(x))


def test_the_sign_packing_and_the_pooled_tail_are_called_directly_and_follow_changes(isa: str) -> None:
    """A plan calls the first conv's sign packing and the pooled tail's ops without module calls; a new tail
    weight assigned, or a hook on either layer, is followed at the next call (the same outputs as module by
    module, bit for bit)."""
    from bnnslim.runtime.segments import plan_steps
    from bnnslim.runtime.tails import PooledLinear

    fused = to_runtime(_chain_model())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = fused(x)
        assert torch.equal(fused(x), want)
        planned = plan_steps(list(fused))
        assert planned is not None
        pack, tail = fused[1], fused[-1]
        assert isinstance(pack, PackSigns) and pack.conv is not None and isinstance(tail, PooledLinear)
        if build.available_ops() is not None:
            assert pack in planned[1] and tail in planned[1]
        tail.weight = nn.Parameter(tail.weight.flip(0))
        got = fused(x)
        assert torch.equal(got, _module_by_module(fused)(x)) and not torch.equal(got, want)
        seen: list[str] = []
        hooks = [pack.register_forward_hook(lambda m, i, o: seen.append("pack")),
                 tail.register_forward_hook(lambda m, i, o: seen.append("tail"))]
        assert torch.equal(fused(x), got) and seen == ["pack", "tail"]
        for h in hooks:
            h.remove()
        assert torch.equal(fused(x), got) and seen == ["pack", "tail"]


def test_a_plan_follows_a_conversion_of_the_model(kernels: build.KernelStatus) -> None:
    """``.half()`` then ``.float()`` puts new (rounded) tensors into the layers' dicts without attribute assignment:
    the next call plans again on them, the same outputs as module by module, bit for bit."""
    fused = to_runtime(_chain_model())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = fused(x)
        assert torch.equal(fused(x), want)  # planned
        fused.half().float()
        got = fused(x)
        assert torch.equal(got, _module_by_module(fused)(x)) and not torch.equal(got, want)


def _nested_chain_model() -> nn.Module:
    """The chain of :func:`_chain_model` with its stages in sequences of their own (as the examples nest blocks)."""
    flat = list(_chain_model())
    return nn.Sequential(nn.Sequential(*flat[:4]), nn.Sequential(*flat[4:8]), nn.Sequential(*flat[8:11]),
                         nn.Sequential(*flat[11:14]), *flat[14:]).eval()


def test_nested_sequences_run_as_one_plan(isa: str) -> None:
    """Stages nested in sequences run as one plan: a conv reading the bits of the sequence before it is called
    directly too, the output is the layer-by-layer run's bit for bit, and a hook on a nested sequence fires."""
    from bnnslim.runtime.layers import PackedBinaryConv2d
    from bnnslim.runtime.segments import PackedSequential, plan_steps

    fused = to_runtime(_nested_chain_model())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = _module_by_module(fused)(x)
        assert torch.equal(fused(x), want) and torch.equal(fused(x), want)
        planned = plan_steps(list(fused))
        assert planned is not None
        _, bypassed = planned
        assert sum(type(m) is PackedSequential for m in bypassed) == 4
        assert sum(isinstance(m, PackedBinaryConv2d) for m in bypassed) == 3  # each reads bits, none a module call
        assert torch.equal(fused(x), with_emulation(fused)(x))
        seen: list[torch.Size] = []
        handle = fused[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert torch.equal(fused(x), want) and len(seen) == 1
        handle.remove()


def test_hooks_on_a_layer_of_a_fused_sequence_still_fire(kernels: build.KernelStatus) -> None:
    """A hook on a layer the plan would call directly (bench's per-layer timing) makes the sequence call it."""
    fused = to_runtime(_chain_model())
    x = torch.randn(1, 3, 16, 16)
    seen: list[torch.Size] = []
    with torch.no_grad():
        y = fused(x)
        fused(x)
        handle = fused[11].register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert torch.equal(fused(x), y) and len(seen) == 1
        handle.remove()
        fused(x)
    assert len(seen) == 1


def test_inputs_that_only_the_first_conv_kernel_reads_come_in_as_they_are(isa: str) -> None:
    """An image's first conv computed by the sign packing reads any memory format: the model takes NCHW and
    channels-last inputs as they come (no conversion on entry), with the same outputs bit for bit; a model whose
    input a packed conv reads itself still gets it channels-last."""
    fused = to_runtime(_chain_model())
    x = torch.randn(2, 3, 16, 16)
    seen: list[bool] = []
    with torch.no_grad():
        y = fused(x)
        assert torch.equal(fused(x.contiguous(memory_format=torch.channels_last)), y)
        assert torch.equal(y, _module_by_module(fused)(x))
        every_other = torch.randn(2, 3, 32, 32)[:, :, ::2, ::2]  # a strided view
        assert torch.equal(fused(every_other), fused(every_other.contiguous()))
        handle = fused[0].register_forward_pre_hook(lambda m, i: seen.append(i[0].is_contiguous()))
        assert torch.equal(fused(x), y)
        handle.remove()
        assert seen == [True]  # NCHW memory, untouched
        direct = to_runtime(nn.Sequential(binary_conv(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardtanh(),
                                          binary_conv(16, 16, 3, padding=1)).eval())
        handle = direct[0].register_forward_pre_hook(
            lambda m, i: seen.append(i[0].is_contiguous(memory_format=torch.channels_last)))
        direct(x)
        handle.remove()
    assert seen == [True, True]


def test_a_plan_follows_the_kernel_forced_through_the_environment(kernels: build.KernelStatus,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Forcing a kernel with BNNSLIM_RUNTIME_ISA between calls makes a planned model plan again on that kernel
    (the same outputs bit for bit), and unsetting it goes back to the CPU's own."""
    fused = to_runtime(_chain_model())
    x = torch.randn(1, 3, 16, 16)
    monkeypatch.delenv(build.ENV_ISA, raising=False)
    with torch.no_grad():
        y = fused(x)  # the first call builds the layers' kernel objects, the second plans with them
        assert torch.equal(fused(x), y)
        assert build.env_isa() is None and fused.__dict__["_plan"][0][1] is None
        monkeypatch.setenv(build.ENV_ISA, "scalar")
        assert build.env_isa() == "scalar" and build.isa_code() == build.ISA_CODES["scalar"]
        assert torch.equal(fused(x), y) and torch.equal(fused(x), y)
        assert fused.__dict__["_plan"][0][1] == "scalar"
        monkeypatch.delenv(build.ENV_ISA)
        assert torch.equal(fused(x), y) and torch.equal(fused(x), y)
        assert fused.__dict__["_plan"][0][1] is None


def test_packed_input_layout(kernels: build.KernelStatus) -> None:
    """pack_input: sign and nonzero bits along channels, LSB first, zero padding, stride phases."""
    x = torch.randn(1, 70, 3, 5)
    x[0, 3, 1, 2] = 0.0
    packed = build.ops().pack_input(x, [1, 0, 2, 1], 2, 1, None, 0)
    hp, _wp, wq = 4, 8, 4 + 8
    assert packed.shape == (1, hp, 2, 2, 2, wq)
    for c in (0, 3, 63, 64, 69):
        for h in range(3):
            for w in range(5):
                iw = w + 2
                word = packed[0, h + 1, c // 64, :, iw % 2, iw // 2]
                bit = lambda v, c=c: (int(v) >> (c % 64)) & 1  # noqa: E731
                assert bit(word[0]) == int(x[0, c, h, w] > 0)
                assert bit(word[1]) == int(x[0, c, h, w] != 0)
    assert int(packed[0, 0].abs().sum()) == 0  # the padding row
    assert int(packed[0, :, 1, :, :, :].bitwise_and(~((1 << 6) - 1)).abs().sum()) == 0  # channels 70..127


# ---------------------------------------------------------------- whole models


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def binary_example(name: str, trained_bn: bool = True, width: float | None = None,
                   batch: int = 3) -> tuple[nn.Module, torch.Tensor, list[str]]:
    example = load_example(name)
    model = example.tiny() if width is None else example.build_model(width=width)
    x = torch.randn(batch, *example.INPUT_SHAPE)
    plan = plan_binarization(model, x[:1])
    apply_binarization(model, plan.binary, builtin_scheme("xnor"))
    if not trained_bn:
        return model.eval(), x, plan.binary
    # Trained-looking batch norms. With fresh ones (mean 0, shift 0) a binary
    # conv's dot product of exactly 0 stays 0 in the runtime, but BinaryConv2d's
    # float sum of +-alpha terms can leave +-1e-8, which the next sign() turns
    # into +-1: the two models then part ways (see test_examples_equal_their_emulation).
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model.eval(), x, plan.binary


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("name", ["small_cnn", "nin", "vgg11", "resnet18"])
def test_examples_convert_and_match(name: str, channels_last: bool, kernels: build.KernelStatus) -> None:
    model, x, binary = binary_example(name)
    runtime = to_runtime(model, channels_last=channels_last)
    plan = runtime_plan(runtime)
    assert sorted(plan.kernel) == sorted(binary) and not plan.emulated and not plan.unchanged
    assert all(isinstance(runtime.get_submodule(n), PackedBinaryConv2d) for n in binary)
    assert isinstance(model.get_submodule(binary[0]), BinaryConv2d), "the original model is left alone"
    with torch.no_grad():
        want = model(x)
        got = runtime(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("name", ["small_cnn", "nin", "vgg11", "resnet18"])
def test_examples_equal_their_emulation(name: str, channels_last: bool, kernels: build.KernelStatus) -> None:
    """Fresh batch norms (many exact-zero dot products, ties for sign()): runtime == packed emulation, bit for bit."""
    model, x, binary = binary_example(name, trained_bn=False, width=0.25, batch=1)
    runtime = to_runtime(model, channels_last=channels_last)
    reference = with_emulation(runtime)
    assert sorted(runtime_plan(reference).emulated) == sorted(binary)
    with torch.no_grad():
        assert torch.equal(runtime(x), reference(x))


def _as_written(model: nn.Module) -> nn.Module:
    """A copy whose blocks run their class's forward (no planned graphs) and whose sequences call every layer."""
    from bnnslim.runtime.blocks import BlockForward

    twin = _module_by_module(model)
    for m in twin.modules():
        if isinstance(m.__dict__.get("forward"), BlockForward):
            del m.forward
    return twin


def _runs_a_plan(block: nn.Module) -> bool:
    """Whether the block's last call made or kept a plan (rather than falling back to its own forward)."""
    made = block.forward.__dict__.get("_made")
    return made is not None and made[1] is not None


class _TwoPaths(nn.Module):
    """A block torch.fx cannot trace (the branch depends on a value)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = binary_conv(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.Hardtanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return self.act(y + x) if bool(x.sum() > 0) else self.act(y - x)


def test_residual_blocks_run_a_planned_graph_that_equals_their_own_forward(isa: str) -> None:
    """ResNet blocks skip the layers folded or fused away, call the bit-reading conv's kernel directly (it adds the
    shortcut and clamps as it finishes) and the shortcut's layers without their sequence: the output is the
    blocks' own forward's, bit for bit, and the emulation's; the state dict, the classes and a hook on a skipped
    layer are as before."""
    from bnnslim.runtime.blocks import BlockForward, plan_block, plan_graph

    model, x, _ = binary_example("resnet18", trained_bn=False, width=0.25, batch=1)
    runtime = to_runtime(model)
    block = runtime.layer2[0]
    assert type(block).__name__ == "BasicBlock" and isinstance(block.forward, BlockForward)
    with torch.no_grad():
        want = _as_written(runtime)(x)
        first = runtime(x)  # makes the kernel objects; the next call plans
        assert torch.equal(first, want) and torch.equal(runtime(x), want) and torch.equal(runtime(x), want)
        assert torch.equal(runtime(x), with_emulation(runtime)(x))
        assert list(runtime.state_dict()) == list(_as_written(runtime).state_dict())  # the plans hold no state
        planned = plan_graph(block)
        assert planned is not None
        graph, bypassed = planned
        # the shortcut's sequence is inlined (its folded batch norm dropped), and the convs reading floats (conv1,
        # the shortcut's) call their kernel objects too: no child is called as a module
        assert {id(m) for m in bypassed} == {id(m) for m in (block.bn1, block.act1, block.conv2, block.bn2,
                                                             block.shortcut, block.shortcut[1], block.conv1,
                                                             block.shortcut[0])}
        code = graph.code
        assert ".add_clamp(" in code and "act2" not in code and "bn1" not in code  # the kernel adds and clamps
        # so the block runs as one C++ call: conv1 and the shortcut's conv on the input's floats, conv2 with the add
        program = plan_block(block)[0]  # type: ignore[index]
        assert isinstance(program, build.available_ops().BlockProgram)  # type: ignore[union-attr]
        assert [kind for kind, *_ in program.steps] == [0, 0, 1]
        root = plan_graph(runtime)
        assert root is not None  # sequences of blocks and the stem stay calls: their own plans run them
        assert "self.layer1(" in root[0].code and "self.stem(" in root[0].code
        assert not isinstance(plan_block(runtime)[0], type(program))  # type: ignore[index]  # it calls modules
        runtime(x)
        assert _runs_a_plan(block)
        # a hook on a skipped layer: the block calls its layers as written while the hook is there
        seen: list[torch.Size] = []
        handle = block.bn2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert torch.equal(runtime(x), want) and len(seen) == 1
        handle.remove()
        # an undone fusion replans the block: conv1 writes floats again, bn1 and act1 come back
        unfuse(runtime, "layer2.0.conv1", "test")
        assert type(block.bn1) is nn.BatchNorm2d
        assert torch.equal(runtime(x), _as_written(runtime)(x))
        got = runtime(x)
        assert torch.equal(got, _as_written(runtime)(x))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # a NaN in the input on the first planned call does not cost the block its plan
        nan = x.clone()
        nan[0, 0, 0, 0] = float("nan")
        runtime.layer2[0].conv1.use_emulation("test")  # a change: every block plans again, on the NaN input
        runtime(nan)
        assert _runs_a_plan(block)
        # a copy plans for itself and runs its own layers
        twin = copy.deepcopy(runtime)
        assert twin.layer2[0].forward.block is twin.layer2[0]
        twin.layer2[0].conv2.use_emulation("test")
        assert torch.equal(twin(x), got) and torch.equal(twin(x), got)


def test_a_stage_of_residual_blocks_is_one_cpp_call_that_follows_the_blocks(kernels: build.KernelStatus) -> None:
    """Blocks whose planned graph is all kernel calls and residual adds run as one C++ program each, and a
    sequence of them (a ResNet stage) as one call: the output is the blocks' own forward's, bit for bit; an input
    the program was not made for, and a child replaced after planning, run the block as written; the model is
    still freed when dropped (the programs hold no cycle the collector cannot see)."""
    import gc
    import weakref

    model, x, _ = binary_example("resnet18", trained_bn=False, width=0.25, batch=1)
    runtime = to_runtime(model)
    program_type = build.available_ops().BlockProgram  # type: ignore[union-attr]
    with torch.no_grad():
        want = _as_written(runtime)(x)
        for _ in range(3):  # kernel objects, then the blocks' plans, then the stages' plans
            assert torch.equal(runtime(x), want)
        stage = runtime.layer2
        steps = stage.__dict__["_plan"][1]
        assert len(steps) == 1 and len(steps[0]) == 2  # one chain of the two blocks' programs
        assert all(isinstance(b.forward.__dict__["_made"][1][0], program_type) for b in stage)
        assert torch.equal(runtime(x), want)
        # an input the program was not made for: the block as written (float64 all the way)
        feats = _as_written(runtime).layer1(_as_written(runtime).stem(x))
        got64 = stage(feats.double())
        assert got64.dtype == torch.float64
        assert torch.equal(got64, _as_written(runtime).layer2(feats.double()))
        # a child replaced after planning (a plain block does not report it): the stage's chain notices
        runtime(x)
        block = runtime.layer2[1]
        block.act2 = nn.ReLU()
        before = generation()
        got = runtime(x)  # (before _as_written: copying a runtime model makes every plan anew)
        assert generation() > before  # the stale program ran the block as written and had every plan made anew
        assert torch.equal(got, _as_written(runtime)(x)) and not torch.equal(got, want)
        runtime(x)
        runtime(x)  # the block's new plan, then the stage's: a program again, with the ReLU's clamp
        made = block.forward.__dict__["_made"][1][0]
        assert isinstance(made, program_type) and made.steps[-1][4:] == (0.0, float("inf"))
        assert torch.equal(runtime(x), got)
    refs = [weakref.ref(m) for m in runtime.modules()]
    del runtime, stage, block, steps, made
    gc.collect()
    assert all(r() is None for r in refs)


class _ConvNormAct(nn.Sequential):
    """torchvision's Conv2dNormActivation: a Sequential subclass with Sequential's forward."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1, act: bool = True) -> None:
        super().__init__(binary_conv(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         *([nn.ReLU()] if act else []))


class _Transform(nn.Sequential):
    """RegNet's BottleneckTransform: sequences of conv, norm and activation in a sequence subclass."""

    def __init__(self, c: int) -> None:
        super().__init__(_ConvNormAct(c, c, 1), _ConvNormAct(c, c, 3, groups=2), _ConvNormAct(c, c, 1, act=False))


class _ResBottleneck(nn.Module):
    """RegNet's ResBottleneckBlock: ``activation(x + f(x))``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = _Transform(c)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x + self.f(x))


def test_sequence_subclasses_inside_a_block_are_inlined_into_its_program(kernels: build.KernelStatus) -> None:
    """Sequences nested in a block (torchvision's Conv2dNormActivation inside RegNet's BottleneckTransform) run
    their layers from the block's own plan: the block is one C++ program, equal to its forward as written bit for
    bit, and a hook on a layer nested two sequences deep still fires."""
    from bnnslim.runtime.blocks import plan_graph

    torch.manual_seed(5)
    model = nn.Sequential(_ResBottleneck(64), _ResBottleneck(64)).eval()
    _random_bn(model, seed=6)
    runtime = to_runtime(model)
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        want = _as_written(runtime)(x)
        for _ in range(3):
            assert torch.equal(runtime(x), want)
        block = runtime[0]
        graph = plan_graph(block)
        assert graph is not None and "self.f" not in graph[0].code  # the nested sequences are inlined
        assert isinstance(block.forward.__dict__["_made"][1][0], build.available_ops().BlockProgram)  # type: ignore[union-attr]
        seen: list[int] = []
        handle = block.f[1][0].register_forward_hook(lambda m, i, o: seen.append(1))
        assert torch.equal(runtime(x), want) and seen == [1]
        handle.remove()
        assert torch.equal(runtime(x), want)


class _Stage(nn.Sequential):
    """RegNet's AnyStage: a Sequential subclass of residual blocks (a block of its own, not a plain sequence)."""


class _TakesAList(nn.Module):
    """DenseNet's dense layer: called with several tensors at once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = binary_conv(64, 64, 3, padding=1, bias=False)

    def forward(self, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.conv(torch.cat(xs, 1))


class _CallsAListTaker(nn.Module):
    """DenseNet's dense block: calls its layer with one value (traced as one node) holding several tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = _TakesAList()
        self.bn = nn.BatchNorm2d(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.layer(torch.split(x, 32, dim=1)))


def test_blocks_of_planned_blocks_are_programs_of_programs(kernels: build.KernelStatus) -> None:
    """A block whose children are blocks planned as one C++ call (RegNet's AnyStage of ResBottleneckBlocks) calls
    their programs from its own, without their module calls: equal to its forward as written bit for bit, hooks on a
    layer three blocks deep still fire. A child called with what a plan does not take (several tensors, as
    DenseNet's layers are) is called as a module and does not stop its parent's plan."""
    from bnnslim.runtime.blocks import plan_graph

    torch.manual_seed(7)
    model = nn.Sequential(_Stage(_ResBottleneck(64), _ResBottleneck(64)), _CallsAListTaker()).eval()
    _random_bn(model, seed=8)
    runtime = to_runtime(model)
    x = torch.randn(1, 64, 8, 8)
    program_type = build.available_ops().BlockProgram  # type: ignore[union-attr]
    with torch.no_grad():
        want = _as_written(runtime)(x)
        for _ in range(5):  # kernel objects, then each level of blocks plans once the level below has
            assert torch.equal(runtime(x), want)
        stage = runtime[0]
        program = stage.forward.__dict__["_made"][1][0]
        assert isinstance(program, program_type) and [kind for kind, *_ in program.steps] == [4, 4]
        assert isinstance(runtime.__dict__["_plan"][1][0], program_type)  # the outer sequence calls it directly
        taker = runtime[1]
        assert plan_graph(taker) is not None and "self.layer(" in plan_graph(taker)[0].code  # type: ignore[index]
        seen: list[int] = []
        handle = stage[1].f[2][0].register_forward_hook(lambda m, i, o: seen.append(1))
        assert torch.equal(runtime(x), want) and seen == [1]
        handle.remove()
        assert torch.equal(runtime(x), want)


class _SharedReluBlock(nn.Module):
    """torchvision's BasicBlock pattern: one ReLU module called twice, ``out += identity``; with ``alias`` the
    conv output is also read after the in-place add (which must then see the sum)."""

    def __init__(self, alias: bool) -> None:
        super().__init__()
        self.alias = alias
        self.conv1 = binary_conv(64, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = binary_conv(64, 64, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.bn1(self.conv1(x))))
        kept = out
        out += x
        out = self.relu(out)
        return out + kept if self.alias else out


@pytest.mark.parametrize("alias", [False, True], ids=["plain", "aliased"])
def test_in_place_residual_adds_and_shared_activations_are_planned_only_where_exact(
        alias: bool, kernels: build.KernelStatus) -> None:
    """A shared ReLU fused away after the first conv still clamps after the add, and ``out += x`` becomes the
    fused add; where ``out`` is read again after the in-place add the block keeps its own forward."""
    from bnnslim.runtime.blocks import plan_graph

    model = nn.Sequential(_SharedReluBlock(alias)).eval()
    _random_bn(model, seed=4)
    runtime = to_runtime(model)
    x = torch.randn(1, 64, 6, 6)
    with torch.no_grad():
        want = _as_written(runtime)(x.clone())
        assert torch.equal(runtime(x.clone()), want) and torch.equal(runtime(x.clone()), want)
        # the aliased block's graph (torch.fx records ``out += x`` as ``out + x``) disagrees with its forward:
        # the check on the first planned call drops it
        assert _runs_a_plan(runtime[0]) is not alias
        planned = plan_graph(runtime[0])
        code = planned[0].code if planned is not None else ""
        assert "act" not in code and "relu" not in code  # the ReLU after the add is the clamp in both
        assert (".add_clamp(" in code) is not alias  # in place only where nothing else reads the output


def _layer_with_kernel_object(cin: int, cout: int, shape: tuple[int, ...], seed: int
                              ) -> tuple[PackedBinaryConv2d, Any, torch.Tensor]:
    """A packed 3x3 conv that has run once (so it holds its C++ kernel object), that object and an input."""
    packed = PackedBinaryConv2d.from_binary_conv(binary_conv(cin, cout, 3, padding=1))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        packed(x)
    call = packed.kernel_call()
    assert call is not None
    return packed, call, x


def test_a_planned_float_reading_conv_takes_its_own_call_for_inputs_its_kernel_was_not_made_for(
        kernels: build.KernelStatus) -> None:
    """A block plan calls a float-reading conv's kernel object directly only on float32 inputs with the layer's
    channels; anything else (float64 here) goes through the layer, which emulates it."""
    from bnnslim.runtime.blocks import run_on_floats

    packed, call, x = _layer_with_kernel_object(8, 16, (1, 8, 6, 6), seed=7)
    with torch.no_grad():
        assert torch.equal(run_on_floats(call, packed, x), packed(x))
        wide = x.double()
        got = run_on_floats(call, packed, wide)
        assert got.dtype == torch.float64 and torch.equal(got, packed(wide))


def test_a_conv_kernel_adds_a_residual_and_clamps_as_torch_does(kernels: build.KernelStatus) -> None:
    """The kernel object's ``add_clamp(x, r, lo, hi)`` (a block's last conv, its residual add and the activation
    after it in one call) gives ``clamp(conv(x) + r)`` bit for bit, NaN included, whatever the residual's memory
    layout, shape (broadcast) or dtype (torch's promotion)."""
    _, call, x = _layer_with_kernel_object(16, 24, (1, 16, 9, 7), seed=5)
    with torch.no_grad():
        out = call(x)
        r = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)) * 20
        r[0, 3, 2, 1] = float("nan")
        residuals = [r.contiguous(memory_format=torch.channels_last), r.contiguous(), r[:, :, :1, :1].clone(),
                     r.double()]
        for res in residuals:
            for lo, hi in ((-1.0, 1.0), (0.0, float("inf"))):
                want = torch.add(call(x), res).clamp_(lo, hi)
                got = call.add_clamp(x, res, lo, hi)
                assert got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_blocks_torch_fx_cannot_trace_or_autograd_run_their_own_forward(kernels: build.KernelStatus) -> None:
    """A block with value-dependent control flow runs as written (both branches right); so does a call with
    autograd on."""
    block = nn.Sequential(_TwoPaths()).eval()
    _random_bn(block, seed=3)
    runtime = to_runtime(block)
    for sign in (1.0, -1.0):
        x = torch.randn(1, 8, 6, 6).abs() * sign
        with torch.no_grad():
            want = _as_written(runtime)(x)
            assert torch.equal(runtime(x), want) and torch.equal(runtime(x), want)
    x.requires_grad_(True)
    assert torch.equal(runtime(x).detach(), want)


class _LayerScaled(nn.Module):
    """A residual block whose forward reads a parameter of its own (ConvNeXt's layer scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = binary_conv(8, 8, 3, padding=1)
        self.layer_scale = nn.Parameter(torch.rand(8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.conv(x)


def test_a_block_reading_its_own_parameter_is_planned(kernels: build.KernelStatus) -> None:
    """A block whose forward uses a parameter directly (torchvision's ConvNeXt) runs its planned graph, which
    reads that very parameter: equal to the forward as written, also after the parameter changes."""
    torch.manual_seed(24)
    runtime = to_runtime(nn.Sequential(_LayerScaled(), nn.Hardtanh(), _LayerScaled()).eval())
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        want = _as_written(runtime)(x)
        assert torch.equal(runtime(x), want) and torch.equal(runtime(x), want)  # the second call runs the plan
        assert runtime[0].forward.__dict__["_made"][1] is not None, "the block got a plan"
        runtime[0].layer_scale.mul_(-2.0)
        assert torch.equal(runtime(x), _as_written(runtime)(x)) and not torch.equal(runtime(x), want)


@pytest.mark.parametrize("name", ["nin", "resnet18"])
def test_packed_file_tensors_are_used_as_exported(name: str, kernels: build.KernelStatus) -> None:
    """bnnslim.load(..., runtime='packed'): the export's bits and alpha drive the kernels directly."""
    from bnnslim.model_file import packed_tensors

    model, x, binary = binary_example(name)
    tensors = packed_tensors(model)
    runtime = to_runtime(model, packed=tensors)
    for layer in binary:
        assert torch.equal(runtime.get_submodule(layer).weight_bits, tensors[f"{layer}.weight_bits"])
    with torch.no_grad():
        torch.testing.assert_close(runtime(x), model(x), rtol=1e-4, atol=1e-4)
    damaged = dict(tensors)
    damaged[f"{binary[0]}.weight_bits"] = tensors[f"{binary[0]}.weight_bits"][:, :, :, :1][:-1]
    with pytest.raises(BnnslimError, match="packed weights of shape"):
        to_runtime(model, packed=damaged)
    del damaged[f"{binary[0]}.weight_bits"]
    with pytest.raises(BnnslimError, match="lack"):
        to_runtime(model, packed=damaged)
    no_alpha = {k: v for k, v in tensors.items() if k != f"{binary[0]}.alpha"}
    with pytest.raises(BnnslimError, match="alpha"):
        to_runtime(model, packed=no_alpha)


def test_scheme_that_is_not_sign_is_left_unchanged(kernels: build.KernelStatus) -> None:
    from bnnslim.plugin_types import SchemeSpec

    xnor = builtin_scheme("xnor")
    ge0 = SchemeSpec("ge0", "x >= 0 -> +1", lambda t: torch.where(t >= 0, 1.0, -1.0), xnor.binarize_weight,
                     xnor.scale)
    model = nn.Sequential(binary_conv(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    model[0].scheme = ge0
    runtime = to_runtime(model)
    assert isinstance(runtime[0], BinaryConv2d)
    assert "sign" in runtime_plan(runtime).unchanged["0"]


# ---------------------------------------------------------------- fallback, bad input, threads


@pytest.fixture
def fresh_build() -> Iterator[None]:
    build.reset()
    yield
    build.reset()


def test_forced_fallback_same_result_one_warning(kernels: build.KernelStatus, fresh_build: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, binary = binary_example("small_cnn")
    runtime = to_runtime(model)
    with torch.no_grad():
        fast = runtime(x)
    build.reset()
    monkeypatch.setenv(build.ENV_FALLBACK, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            slow = [runtime(x) for _ in range(3)]
    fallback = [w for w in caught if issubclass(w.category, RuntimeFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert build.ENV_FALLBACK in str(fallback[0].message)
    assert not kernel_status().available and kernel_status().isa == "torch-emulation"
    assert sorted(runtime_plan(runtime).emulated) == sorted(binary)
    for y in slow:
        assert torch.equal(y, fast)


def test_failed_build_falls_back(fresh_build: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "_kernels.cpp"
    broken.write_text("#error this source is broken on purpose\n", encoding="utf-8")
    monkeypatch.setattr(build, "SOURCE", broken)
    monkeypatch.setenv(build.ENV_CACHE, str(tmp_path / "cache"))
    with pytest.warns(RuntimeFallbackWarning, match="emulation"):
        status = kernel_status()
    assert not status.available and status.reason
    layer = binary_conv(20, 8, 3, padding=1)
    x = torch.randn(1, 20, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        got = PackedBinaryConv2d.from_binary_conv(layer)(x)
    torch.testing.assert_close(got, layer(x).detach(), rtol=1e-5, atol=1e-4)


def test_stale_build_lock_is_cleared(kernels: build.KernelStatus, fresh_build: None) -> None:
    """A build killed half-way leaves cpp_extension's lock file; later processes must not wait on it forever."""
    assert kernels.library is not None
    lock = kernels.library.parent / "lock"
    lock.write_text("", encoding="utf-8")
    old = time.time() - build.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    try:
        build.reset()
        assert kernel_status().available
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)


def test_unknown_or_missing_isa_is_an_error(kernels: build.KernelStatus, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = PackedBinaryConv2d.from_binary_conv(binary_conv(8, 8, 3))
    monkeypatch.setenv(build.ENV_ISA, "sse9")
    with pytest.raises(BnnslimError, match="not a kernel"):
        layer(torch.randn(1, 8, 5, 5))
    missing = [n for n in ALL_ISAS if n not in cpu_isas()]
    if missing:
        monkeypatch.setenv(build.ENV_ISA, missing[0])
        with pytest.raises(BnnslimError, match="lacks"):
            layer(torch.randn(1, 8, 5, 5))


def test_corrupt_packed_weights_are_refused() -> None:
    signs = torch.where(torch.randn(4, 20, 3, 3) >= 0, 1.0, -1.0)
    bits = pack_signs(signs)  # 3 bytes per tap
    with pytest.raises(BnnslimError, match="bytes per tap"):
        PackedBinaryConv2d(bits, 30)
    with pytest.raises(BnnslimError, match="uint8"):
        PackedBinaryConv2d(bits.float(), 20)
    with pytest.raises(BnnslimError, match="alpha"):
        PackedBinaryConv2d(bits, 20, alpha=torch.ones(3))
    with pytest.raises(BnnslimError, match="groups"):
        PackedBinaryConv2d(bits, 20, groups=3)
    with pytest.raises(BnnslimError, match="NaN"):
        PackedBinaryConv2d(bits, 20, alpha=torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(BnnslimError, match=r"\[N, 20, H, W\]"):  # never a silent wrong answer
        PackedBinaryConv2d(bits, 20)(torch.randn(1, 24, 5, 5))


def test_constructor_from_export_tensors_matches(kernels: build.KernelStatus) -> None:
    """What bnnslim.load does: weight_bits + alpha + bias + hyper-parameters."""
    layer = binary_conv(40, 12, 3, stride=2, padding=1)
    w = layer.weight.detach()
    alpha = w.abs().mean(dim=(1, 2, 3))
    packed = PackedBinaryConv2d(pack_signs(torch.where(w >= 0, 1.0, -1.0)), 40, alpha=alpha,
                                bias=layer.bias.detach(), stride=2, padding=1)
    x = torch.randn(2, 40, 9, 9)
    torch.testing.assert_close(packed(x), layer(x).detach(), rtol=1e-5, atol=1e-4)
    assert set(packed.state_dict()) == {"weight_bits", "alpha", "bias"}


def test_threads_above_cores_warn() -> None:
    before = torch.get_num_threads()
    try:
        with pytest.warns(ThreadsWarning, match="above"):
            set_threads(available_cores() + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            set_threads(1)
        with pytest.raises(BnnslimError):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- fused binary blocks


def _random_bn(model: nn.Module, seed: int) -> None:
    """Batch norms with scales of both signs (a negative scale flips the threshold comparison)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def _consumer_inputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The {-1, 0, +1} signs each named packed conv gets (unpacked when it reads bits)."""
    from bnnslim.runtime.bits import unpack_ternary

    got: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        layer = model.get_submodule(name)

        def hook(m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            a = args[0]
            got[name] = unpack_ternary(a, m.in_channels) if a.dtype == torch.int64 else torch.sign(a)
        handles.append(layer.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return got


# binary convs that hand bits on, in the tiny examples (the rest feed pooling, residual adds or real layers)
FUSED_COUNTS = {"small_cnn": 2, "nin": 5, "vgg11": 6, "resnet18": 8}


@pytest.mark.parametrize("name", list(FUSED_COUNTS))
def test_fused_chains_are_exact(name: str, isa: str) -> None:
    """Fused (bits between binary convs) == unfused: every binary conv gets the same signs; outputs agree."""
    model, x, binary = binary_example(name, trained_bn=False)
    _random_bn(model, seed=1)
    plain = to_runtime(model, fuse=False)
    fused = to_runtime(model)
    plan = runtime_plan(fused)
    assert len(plan.fused) == FUSED_COUNTS[name], plan.not_fused
    assert all(fused.get_submodule(c).input_bits for c in plan.fused.values())
    want = _consumer_inputs(plain, x, binary)
    got = _consumer_inputs(fused, x, binary)
    for layer in binary:
        assert torch.equal(got[layer], want[layer]), layer
    with torch.no_grad():
        y_fused, y_plain, y_emul = fused(x), plain(x), with_emulation(fused)(x)
    assert torch.equal(y_fused, y_emul), "fused kernels == their torch emulation, bit for bit"
    torch.testing.assert_close(y_fused, y_plain, rtol=1e-5, atol=1e-5)  # only the memory format may differ


@pytest.mark.parametrize(("cin", "cout", "k", "groups", "width"), [
    (96, 80, 1, 1, 32),    # NIN's 1x1 convs: two output words, short dot products
    (40, 100, 3, 1, 13),   # a partial last block of channels, a partial last vector of pixels
    (64, 20, 3, 2, 9),     # grouped: blocks of 10 channels straddle bytes
    (448, 72, 3, 1, 6),    # 63 words per output: past AVX-512's short path
    (1040, 20, 3, 1, 5),   # 153 words per output: past AVX2's short path
])
def test_thresholded_outputs_of_every_shape_are_exact(cin: int, cout: int, k: int, groups: int, width: int,
                                                      isa: str) -> None:
    """A binary conv writing bits for the next one (thresholds from its batch norm, scales of both signs) hands on
    the same signs as the unfused pair, for output counts that fill words, bytes and blocks partly."""
    torch.manual_seed(cin + cout)
    model = nn.Sequential(binary_conv(cin, cout, k, padding=k // 2, groups=groups), nn.BatchNorm2d(cout),
                          nn.Hardtanh(), binary_conv(cout, 8, 3, padding=1)).eval()
    _random_bn(model, seed=cout)
    x = torch.randn(2, cin, 7, width)
    fused = to_runtime(model)
    assert runtime_plan(fused).fused == {"0": "3"}
    want = _consumer_inputs(to_runtime(model, fuse=False), x, ["3"])["3"]
    assert torch.equal(_consumer_inputs(fused, x, ["3"])["3"], want)
    with torch.no_grad():
        assert torch.equal(fused(x), with_emulation(fused)(x))


def test_negative_scale_flips_thresholds(isa: str) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(binary_conv(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.Hardtanh(),
                          nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
                          binary_conv(24, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)).eval()
    _random_bn(model, seed=4)
    with torch.no_grad():
        model[1].weight[:12] = -model[1].weight[:12].abs() - 0.1  # half the channels decreasing
        model[1].weight[12:] = model[1].weight[12:].abs() + 0.1
    x = torch.randn(2, 16, 11, 13)
    fused = to_runtime(model)
    assert runtime_plan(fused).fused == {"0": "4"}
    flips = fused[0].out_thresholds[:, 2]
    assert bool(flips[:12].all()) and not bool(flips[12:].any())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), to_runtime(model, fuse=False)(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(fused(x), with_emulation(fused)(x))


class _TwoUses(nn.Module):
    """A binary conv and its batch norm whose output is used twice (the norm folds, nothing after it)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = binary_conv(16, 24, 3, padding=1), nn.BatchNorm2d(24), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return self.act(y) + y


class _ConvOutputTwice(_TwoUses):
    """The conv's own output is used twice: nothing folds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize(("case", "folded"), [
    ("hardtanh", ["1", "2"]), ("relu", ["1", "2"]), ("relu6", ["1", "2"]), ("bn_then_pool", ["1"]),
    ("two_uses", ["bn"]), ("conv_output_twice", None)])
def test_float_tails_fold_into_the_epilogue(case: str, folded: list[str] | None, isa: str) -> None:
    """A batch norm (and a clamp activation after it) after a float-output packed conv runs in its epilogue."""
    torch.manual_seed(6)
    acts = {"hardtanh": nn.Hardtanh(-0.5, 0.7), "relu": nn.ReLU(), "relu6": nn.ReLU6(), "bn_then_pool": nn.AvgPool2d(2)}
    model: nn.Module
    if case == "two_uses":
        model = _TwoUses(nn.Hardtanh())
    elif case == "conv_output_twice":
        model = _ConvOutputTwice(nn.Identity())
    else:
        model = nn.Sequential(binary_conv(16, 24, 3, padding=1), nn.BatchNorm2d(24), acts[case])
    model.eval()
    _random_bn(model, seed=7)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        bn.weight[:12] = -bn.weight[:12].abs() - 0.1  # negative scales: the map decreases on half the channels
    x = torch.randn(2, 16, 9, 11)
    fused = to_runtime(model)
    plain = to_runtime(model, fuse=False)
    plan = runtime_plan(fused)
    layer = next(m for m in fused.modules() if isinstance(m, PackedBinaryConv2d))
    with torch.no_grad():
        y, want, emulated = fused(x), plain(x), with_emulation(fused)(x)
    if folded is None:
        assert not plan.folded and layer.out_clamp is None
        assert torch.equal(y, want)
        return
    assert list(plan.folded.values()) == [folded]
    assert all(isinstance(fused.get_submodule(n), FoldedAway) for n in folded)
    assert "folded into the epilogue" in repr(fused)
    assert torch.equal(y, emulated), "folded epilogue == its torch emulation, bit for bit"
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)  # folding changes float rounding only
    if case == "hardtanh":
        assert torch.equal(y.amin(), torch.tensor(-0.5)) and torch.equal(y.amax(), torch.tensor(0.7))  # clamped


class _Fire(nn.Module):
    """SqueezeNet's Fire module, binary: one squeeze conv feeding two expand convs (a branch point)."""

    def __init__(self) -> None:
        super().__init__()
        self.squeeze, self.bn, self.act = binary_conv(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU()
        self.e1, self.e3 = binary_conv(8, 12, 1), binary_conv(8, 12, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.act(self.bn(self.squeeze(x)))
        return torch.cat([self.e1(s), self.e3(s)], dim=1)


def test_a_branch_point_hands_the_same_bits_to_every_binary_consumer(isa: str) -> None:
    torch.manual_seed(10)
    model = _Fire().eval()
    _random_bn(model, seed=11)
    x = torch.randn(2, 16, 7, 9)
    fused, plain = to_runtime(model), to_runtime(model, fuse=False)
    plan = runtime_plan(fused)
    assert plan.fused == {"squeeze": "e1"} and plan.fused_also == {"squeeze": ["e3"]}
    assert fused.e1.input_bits and fused.e3.input_bits
    assert _consumer_inputs(fused, x, ["e1", "e3"]).keys() == {"e1", "e3"}
    for name, signs in _consumer_inputs(fused, x, ["e1", "e3"]).items():
        assert torch.equal(signs, _consumer_inputs(plain, x, [name])[name]), name
    with torch.no_grad():
        y = fused(x)
        assert torch.equal(y, with_emulation(fused)(x))
        torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-5)
        unfuse(fused, "squeeze", "test")  # what the plan step does when float wins: both consumers read floats
        assert not fused.e1.input_bits and not fused.e3.input_bits and not runtime_plan(fused).fused
        torch.testing.assert_close(fused(x), y, rtol=1e-5, atol=1e-5)
    # consumers that keep different inputs need different thresholds: not fused
    masked = to_runtime(model, fuse=False)
    masked.e3.input_mask = torch.arange(8) != 3
    report = fuse_binary_chains(masked)
    assert "mask different inputs" in report.not_fused["squeeze"]


@pytest.mark.parametrize(("act", "packs"), [(nn.Hardtanh(), True), (nn.Hardtanh(0.0, 1.0), True), (nn.ReLU(), True),
                                           (nn.ReLU6(), True), (nn.Hardtanh(-1.0, 0.0), False), (nn.Sigmoid(), False)])
def test_real_activations_enter_a_chain_as_bits(act: nn.Module, packs: bool, isa: str) -> None:
    """Real conv -> batch norm -> sign-keeping activation -> max pool -> binary conv: the norm folds into the real
    conv, the activation's input is packed once, the pooling pools bits; undone, the floats come back."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), act, nn.MaxPool2d(2),
                          binary_conv(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.Hardtanh()).eval()
    _random_bn(model, seed=9)
    x = torch.randn(2, 3, 10, 12)
    fused, plain = to_runtime(model), to_runtime(model, fuse=False)
    plan = runtime_plan(fused)
    # not packed, the real conv runs on the small-conv kernel and takes a clamp activation after it in
    clamped = not packs and type(act) is nn.Hardtanh
    assert plan.folded == {"0": ["1", "2"] if clamped else ["1"], "4": ["5", "6"]}
    assert isinstance(fused[0], ComputedByPackSigns if packs else DirectRealConv)
    assert plan.packed_inputs == ({"4": ["0", "1", "2", "3"]} if packs else {})
    # NCHW runtime: packing would first convert to channels-last, dearer than the layers it skips
    assert not runtime_plan(to_runtime(model, channels_last=False)).packed_inputs
    assert fused[4].input_bits is packs
    if packs:
        # the folded norm's place packs the signs of the real conv (3 inputs: computed there, no floats stored),
        # the rest pass bits
        assert isinstance(fused[0], ComputedByPackSigns) and isinstance(fused[1], PackSigns)
        assert fused[1].conv is not None
        assert isinstance(fused[2], FusedAway) and isinstance(fused[3], PackedMaxPool2d)
        assert torch.equal(_consumer_inputs(fused, x, ["4"])["4"], _consumer_inputs(plain, x, ["4"])["4"])
    with torch.no_grad():
        y = fused(x)
        assert torch.equal(y, with_emulation(fused)(x))
        torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-5)
        unpack_input(fused, "4")
        assert not fused[4].input_bits and isinstance(fused[1], FoldedAway)
        assert type(fused[0]) is (nn.Conv2d if packs else DirectRealConv)
        assert type(fused[2]) is (FoldedAway if clamped else type(act)) and type(fused[3]) is nn.MaxPool2d
        torch.testing.assert_close(fused(x), y, rtol=0, atol=0)


@pytest.mark.parametrize(("cin", "cout", "k", "stride", "padding", "size"),
                         [(3, 32, 3, 1, 1, (10, 12)), (1, 5, 3, 2, 0, (9, 7)), (4, 12, 5, 2, 2, (11, 40)),
                          (3, 13, 7, 2, 3, (15, 13)), (2, 8, 1, 1, 0, (3, 4)), (1, 72, 5, 1, 2, (6, 20)),
                          (3, 64, (3, 1), (1, 2), (2, 0), (6, 29)), (1, 130, 3, 1, 1, (5, 14)),
                          (3, 96, 5, 1, 2, (4, 30)), (3, 40, 7, 2, 3, (9, 64))])
def test_a_first_conv_writes_the_signs_of_its_output_as_bits(cin: int, cout: int, k: int | tuple[int, int],
                                                              stride: int | tuple[int, int],
                                                              padding: int | tuple[int, int], size: tuple[int, int],
                                                              isa: str) -> None:
    """A real conv with few inputs followed by a sign-keeping layer into a binary conv: the packing layer computes
    the conv itself; its bits are the signs of torch's conv (values away from 0; NaN gives 0 as in the packers)."""
    from bnnslim.runtime.bits import unpack_ternary

    torch.manual_seed(cin * 1000 + cout)
    model = nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=padding), nn.Hardtanh(),
                          binary_conv(cout, 16, 3, padding=1)).eval()
    x = torch.randn(2, cin, *size)
    x[1, 0, 1, 2] = float("nan")
    fused = to_runtime(model)
    assert isinstance(fused[1], PackSigns) and fused[1].conv is not None and isinstance(fused[0], ComputedByPackSigns)
    with torch.no_grad():
        want = model[0](x)
        bits = fused[1](fused[0](x.contiguous(memory_format=torch.channels_last)))
    got = unpack_ternary(bits, cout)
    expected = torch.sign(torch.nan_to_num(want, nan=0.0))
    away_from_zero = want.abs() > 1e-5
    assert torch.isnan(want).any() and (got[torch.isnan(want)] == 0).all()
    assert torch.equal(got[away_from_zero], expected[away_from_zero])
    with torch.no_grad():
        torch.testing.assert_close(fused(x), to_runtime(model, fuse=False)(x), rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize(("cin", "cout", "k", "stride", "padding", "size", "act"),
                         [(3, 32, 3, 1, 1, (10, 12), nn.Hardtanh()), (1, 5, 3, 2, 0, (9, 7), nn.ReLU()),
                          (4, 13, (3, 1), (1, 2), (2, 0), (6, 29), nn.ReLU6()), (3, 130, 1, 1, 0, (5, 14), None),
                          (2, 40, 5, 2, 2, (11, 17), nn.Hardtanh(-2.0, 0.5)), (3, 64, 7, 2, 3, (21, 18), nn.ReLU())])
def test_a_small_real_conv_with_float_outputs_runs_on_the_kernel(
        cin: int, cout: int, k: int | tuple[int, int], stride: int | tuple[int, int], padding: int | tuple[int, int],
        size: tuple[int, int], act: nn.Module | None, isa: str) -> None:
    """A real first conv whose floats go on (ResNet's stem: a binary conv and the shortcut read them) runs on the
    small-conv kernel with the clamp activation after it: torch's values to float rounding, NaN kept, every output
    channel (none of the kernel's padding up to 8) and channels-last; torch's conv where the ISA has no vector
    tiles."""
    torch.manual_seed(cin * 1000 + cout)
    model = nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=padding), *([act] if act else [])).eval()
    x = torch.randn(2, cin, *size).contiguous(memory_format=torch.channels_last)
    x[1, 0, 1, 2] = float("nan")
    fused = to_runtime(model)
    assert isinstance(fused[0], DirectRealConv) and (act is None or isinstance(fused[1], FoldedAway))
    with torch.no_grad():
        want = model(x)
        got = fused(x)
        assert got.shape == want.shape and torch.isnan(got).any()
        if isa in ("popcnt", "scalar"):  # torch's conv, then the clamp
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        else:
            assert got.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
        # every ISA's tiles, also where forward would take torch's conv
        direct = build.fast_ops().conv_small_float(x, fused[0].conv_weight, fused[0].conv_bias,
                                                   *fused[0].conv_geometry, build.ISA_CODES[isa], cout, fused[0].lo,
                                                   fused[0].hi)
        torch.testing.assert_close(direct, want, rtol=1e-5, atol=1e-5, equal_nan=True)


class _BasicConv(nn.Module):
    """GoogLeNet's ``BasicConv2d``: conv, batch norm, then ``F.relu`` called as a function."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.conv = binary_conv(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def test_an_activation_called_as_a_function_is_applied_by_the_conv_epilogue(kernels: build.KernelStatus) -> None:
    """conv -> bn -> F.relu in a block's forward (and conv -> Hardtanh without a batch norm): the conv's float
    epilogue clamps, the functional call stays in the forward (changing nothing) and the planned block skips it;
    outputs equal the block as written, bit for bit, and the unfused model."""
    from bnnslim.runtime.blocks import plan_graph

    torch.manual_seed(11)
    model = nn.Sequential(_BasicConv(8, 16, 3), _BasicConv(16, 16, 1), binary_conv(16, 8, 3, padding=1),
                          nn.Hardtanh(-0.5, 2.0)).eval()
    _random_bn(model, seed=12)
    x = torch.randn(1, 8, 7, 9)
    runtime = to_runtime(model)
    assert runtime[1].conv.out_clamp is not None and runtime[1].conv.out_clamp.tolist() == [0.0, float("inf")]
    assert runtime[2].out_clamp.tolist() == [-0.5, 2.0] and isinstance(runtime[3], FoldedAway)
    with torch.no_grad():
        want = _as_written(runtime)(x)
        assert torch.equal(runtime(x), want) and torch.equal(runtime(x), want)
        torch.testing.assert_close(want, to_runtime(model, fuse=False)(x), rtol=1e-5, atol=1e-5)
        planned = plan_graph(runtime[1])
        assert planned is not None and "relu" not in planned[0].code
        assert _runs_a_plan(runtime[1])


class _FunctionalTail(nn.Module):
    """ResNet's tail: ``fc(torch.flatten(pool(x), 1))`` in a forward of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = binary_conv(8, 12, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


@pytest.mark.parametrize("tail", ["modules", "functional flatten", "no linear", "shared pool", "1x1 conv head",
                                  "strided 1x1 conv head"])
def test_global_pooling_flatten_and_linear_run_as_one_layer(tail: str, kernels: build.KernelStatus) -> None:
    """A network's tail (global average pooling, flatten, linear) runs as one PooledLinear call: the same outputs
    as the modules (to float rounding) and as the emulation (bit for bit), the linear layer's state keys kept;
    a pooling called twice is left alone. A 1x1 conv before the pooling (NIN's classifier) is that call's linear
    layer (it commutes with the mean); a strided one does not and stays a conv."""
    from bnnslim.runtime.tails import PooledLinear

    torch.manual_seed(5)
    pool = nn.AdaptiveAvgPool2d(1)
    head = [nn.Flatten()] if tail.endswith(("no linear", "head")) else [nn.Flatten(), nn.Linear(12, 5)]
    if tail == "functional flatten":
        model: nn.Module = _FunctionalTail().eval()
    elif tail == "shared pool":
        model = nn.Sequential(binary_conv(8, 12, 3, padding=1), pool, pool, *head).eval()
    elif tail.endswith("head"):
        stride = 2 if tail.startswith("strided") else 1
        model = nn.Sequential(binary_conv(8, 12, 3, padding=1), nn.Conv2d(12, 5, 1, stride=stride), pool,
                              *head).eval()
    else:
        model = nn.Sequential(binary_conv(8, 12, 3, padding=1), pool, *head).eval()
    x = torch.randn(2, 8, 5, 6)
    runtime = to_runtime(model)
    layers = [m for m in runtime.modules() if isinstance(m, PooledLinear)]
    assert len(layers) == (0 if tail == "shared pool" else 1)
    if tail == "1x1 conv head":
        assert runtime[1] is layers[0] and torch.equal(layers[0].weight, model[1].weight)  # [5, 12, 1, 1]
        assert isinstance(runtime[2], FoldedAway) and isinstance(runtime[3], FoldedAway)
    elif tail == "strided 1x1 conv head":
        assert type(runtime[1]) is nn.Conv2d and runtime[3] is layers[0] and layers[0].weight is None
    assert list(runtime.state_dict()) == list(to_runtime(model, fuse=False).state_dict())
    with torch.no_grad():
        got = runtime(x)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(got, with_emulation(runtime)(x))
    if layers:
        assert isinstance(runtime.pool if tail == "functional flatten" else runtime[2 if "head" in tail else 1],
                          FoldedAway)


@pytest.mark.parametrize("shape", [(2, 12, 5, 6), (1, 40, 7, 7), (3, 8, 1, 1)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "flattened"])
def test_the_tail_kernel_equals_its_fallback_bit_for_bit(shape: tuple[int, int, int, int], layout: str,
                                                         kernels: build.KernelStatus,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """PooledLinear on the kernel and on the Python fallback (no compiled kernels) give the same floats, and the
    modules' values to float rounding."""
    from bnnslim.runtime.tails import PooledLinear

    torch.manual_seed(sum(shape))
    linear = nn.Linear(shape[1], 5)
    layer = PooledLinear(linear)
    x = torch.randn(*shape) * 3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "flattened":
        x = x.flatten(1)
    with torch.no_grad():
        got = layer(x)
        monkeypatch.setattr(build, "available_ops", lambda: None)
        fallback = layer(x)
        want = linear(x.reshape(shape[0], shape[1], -1).mean(2))
    assert torch.equal(got, fallback)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", [nn.ReLU(inplace=True), nn.ReLU6(), nn.Hardtanh(0.0, 2.0)])
def test_a_first_conv_then_relu_writes_the_signs_of_its_positive_part(act: nn.Module, isa: str) -> None:
    """conv -> ReLU -> max pool -> binary conv (a VGG's or SqueezeNet's entry): the binary conv sees +1 where the
    conv is positive and 0 elsewhere, never -1; the packing computes the conv and writes exactly that."""
    from bnnslim.runtime.bits import unpack_ternary

    torch.manual_seed(21)
    model = nn.Sequential(nn.Conv2d(3, 40, 5, stride=2, padding=2), act, nn.MaxPool2d(3, 2, ceil_mode=True),
                          binary_conv(40, 16, 1)).eval()
    x = torch.randn(2, 3, 23, 30)
    fused = to_runtime(model)
    assert isinstance(fused[1], PackSigns) and fused[1].positive and fused[1].conv is not None
    with torch.no_grad():
        want = model[0](x)
        got = unpack_ternary(fused[1](fused[0](x.contiguous(memory_format=torch.channels_last))), 40)
        away_from_zero = want.abs() > 1e-5
        assert torch.equal(got[away_from_zero], (want[away_from_zero] > 0).float())
        assert (got >= 0).all()
        y = fused(x)
        assert torch.equal(y, with_emulation(fused)(x))
        torch.testing.assert_close(y, to_runtime(model, fuse=False)(x), rtol=1e-5, atol=1e-5)


class _DenseEntry(nn.Module):
    """DenseNet's entry to a binary conv: a concatenation (no conv to fold a batch norm into), then BN -> act."""

    def __init__(self, act: nn.Module, pool: bool, also_read: bool = False) -> None:
        super().__init__()
        self.also_read = also_read  # the batch norm's output also goes elsewhere
        self.a, self.b = nn.Conv2d(3, 40, 3, padding=1), nn.Conv2d(3, 30, 3, padding=1)
        self.norm = nn.BatchNorm2d(70)
        self.act = act
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.conv = binary_conv(70, 16, 3, padding=1)
        with torch.no_grad():  # trained-looking statistics, scales of both signs
            self.norm.running_mean.normal_(0, 0.3)
            self.norm.running_var.uniform_(0.5, 2.0)
            self.norm.weight.normal_(0, 1)
            self.norm.bias.normal_(0, 0.3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.cat([self.a(x), self.b(x)], 1))
        y = self.conv(self.pool(self.act(h)))
        return y + h[:, :16] if self.also_read else y


@pytest.mark.parametrize("act", [nn.ReLU(), nn.Hardtanh()], ids=["relu", "hardtanh"])
@pytest.mark.parametrize("pool", [False, True], ids=["", "maxpool"])
def test_a_batch_norm_before_the_packing_is_folded_into_it(act: nn.Module, pool: bool, isa: str) -> None:
    """BN -> ReLU (or Hardtanh) -> [max pool] -> binary conv on a concatenation (DenseNet's layers): the sign
    packing computes x * s + t per channel and writes its signs, the batch norm is not run; the runtime equals its
    emulation bit for bit and the unfused model to float rounding, and undoing the packing brings the batch norm
    back."""
    from bnnslim.runtime.bits import unpack_ternary

    torch.manual_seed(22)
    model = _DenseEntry(act, pool)
    x = torch.randn(2, 3, 12, 14)
    fused = to_runtime(model)
    assert isinstance(fused.norm, FoldedAway) and isinstance(fused.act, PackSigns) and fused.act.affine is not None
    assert runtime_plan(fused).packed_inputs == {"conv": ["norm", "act", "pool"]}  # an Identity when not pooling
    with torch.no_grad():
        features = torch.cat([model.a(x), model.b(x)], 1).contiguous(memory_format=torch.channels_last)
        want = model.act(model.norm(features))
        got = unpack_ternary(fused.act(features), 70)
        away_from_zero = want.abs() > 1e-5
        assert torch.equal(got[away_from_zero], torch.sign(want[away_from_zero]))
        y = fused(x)
        assert torch.equal(y, with_emulation(fused)(x))
        torch.testing.assert_close(y, to_runtime(model, fuse=False)(x), rtol=1e-5, atol=1e-5)
    unpack_input(fused, "conv")
    assert type(fused.norm) is nn.BatchNorm2d and type(fused.act) is type(act)


def test_a_batch_norm_read_elsewhere_too_is_not_folded_into_the_packing(kernels: build.KernelStatus) -> None:
    """A batch norm whose output another layer also reads keeps running; the activation still packs."""
    torch.manual_seed(23)
    model = _DenseEntry(nn.ReLU(), pool=False, also_read=True)
    fused = to_runtime(model)
    assert type(fused.norm) is nn.BatchNorm2d and isinstance(fused.act, PackSigns) and fused.act.affine is None
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fused(x), with_emulation(fused)(x))


def test_a_conv_with_many_inputs_or_other_users_is_not_taken_into_the_packing(kernels: build.KernelStatus) -> None:
    """Only a conv with few inputs (an image's) that nothing else reads is computed by the packing layer."""
    wide = to_runtime(nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.Hardtanh(), binary_conv(8, 8, 3)).eval())
    assert isinstance(wide[1], PackSigns) and wide[1].conv is None and type(wide[0]) is nn.Conv2d
    dilated = to_runtime(nn.Sequential(nn.Conv2d(3, 8, 3, dilation=2), nn.Hardtanh(), binary_conv(8, 8, 3)).eval())
    assert isinstance(dilated[1], PackSigns) and dilated[1].conv is None
    large = to_runtime(nn.Sequential(nn.Conv2d(3, 256, 5), nn.Hardtanh(), binary_conv(256, 8, 3)).eval())
    assert isinstance(large[1], PackSigns) and large[1].conv is None  # beyond what runtime_first_conv measured
    # read as floats: a torchvision ResNet's 7x7 stride-2 stem runs on the small-conv kernel, a larger conv not
    stem = to_runtime(nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.ReLU()).eval())
    assert isinstance(stem[0], DirectRealConv) and isinstance(stem[1], FoldedAway)
    assert type(to_runtime(nn.Sequential(nn.Conv2d(3, 256, 5), nn.ReLU()).eval())[0]) is nn.Conv2d


@pytest.mark.parametrize("case", ["avgpool", "hardswish", "pool_after_negative_bn", "shared", "functional"])
def test_chains_that_cannot_fuse_stay_float(case: str, kernels: build.KernelStatus) -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = binary_conv(8, 8, 3, padding=1), binary_conv(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.clamp(self.a(x), -1, 1))

    bn = nn.BatchNorm2d(8)  # a stateful layer called twice cannot be folded into one conv's thresholds
    layers: dict[str, list[nn.Module]] = {
        "avgpool": [binary_conv(8, 8, 3, padding=1), nn.AvgPool2d(2), binary_conv(8, 8, 3, padding=1)],
        "hardswish": [binary_conv(8, 8, 3, padding=1), nn.Hardswish(), binary_conv(8, 8, 3, padding=1)],
        "pool_after_negative_bn": [binary_conv(8, 8, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(8),
                                   binary_conv(8, 8, 3, padding=1)],
        "shared": [binary_conv(8, 8, 3, padding=1), bn, binary_conv(8, 8, 3, padding=1), bn],
    }
    model = Functional().eval() if case == "functional" else nn.Sequential(*layers[case]).eval()
    _random_bn(model, seed=5)
    if case == "pool_after_negative_bn":
        with torch.no_grad():
            model[2].weight[0] = -1.0
    fused = to_runtime(model)
    plan = runtime_plan(fused)
    assert not plan.fused and plan.not_fused
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(fused(x), to_runtime(model, fuse=False)(x))


@pytest.mark.parametrize("pool", [(2, 2, 0, False, 1), (2, 2, 0, True, 1), (3, 2, 1, False, 1),
                                  (3, 2, 1, True, 1), (2, 1, 0, True, 1), (3, 2, 1, False, 2)])
def test_bits_max_pool_equals_torch(pool: tuple[int, int, int, bool, int], kernels: build.KernelStatus) -> None:
    from bnnslim.runtime.bits import max_pool_emulated, pack_ternary, unpack_ternary

    k, s, p, ceil, d = pool
    g = torch.Generator().manual_seed(k * 10 + s)
    values = torch.randint(-1, 2, (2, 70, 9, 7), generator=g).float()
    bits = pack_ternary(values)
    assert torch.equal(unpack_ternary(bits, 70), values)
    got = build.ops().bits_max_pool2d(bits, [k, k], [s, s], [p, p], [d, d], ceil)
    want = F.max_pool2d(values, k, s, p, d, ceil)
    assert torch.equal(unpack_ternary(got, 70), want)
    assert torch.equal(got, max_pool_emulated(bits, 70, (k, k), (s, s), (p, p), (d, d), ceil))


def test_compiler_flags_per_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cflags, ldflags = build.compiler_flags("linux")
    assert "-fopenmp" in cflags and "-fopenmp" in ldflags and "-O3" in cflags
    cflags, ldflags = build.compiler_flags("win32")
    assert "/O2" in cflags and "/openmp" in cflags and not any(f.startswith("-") for f in cflags + ldflags)
    monkeypatch.setattr(build, "_libomp_prefix", lambda: None)
    cflags, ldflags = build.compiler_flags("darwin")
    assert "-fopenmp" not in " ".join(cflags + ldflags), "Apple clang has no OpenMP without libomp"
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "omp.h").write_text("", encoding="utf-8")
    monkeypatch.setattr(build, "_libomp_prefix", lambda: tmp_path)
    cflags, ldflags = build.compiler_flags("darwin")
    assert "-fopenmp" in cflags and "-lomp" in ldflags


@pytest.mark.slow
def test_build_without_ninja(tmp_path: Path) -> None:
    """No ninja: one direct compiler call builds the same kernels, with a progress line, into the cache.

    In a fresh process: a second copy of the kernels' library cannot be loaded beside the one the
    other tests loaded (torch aborts on ops registered twice).
    """
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    program = ("import bnnslim.runtime.build as b\n"
               "b._ninja_available = lambda: False\n"
               "s = b.kernel_status()\n"
               "print(s.available, s.reason)\n"
               "print(s.library)\n")
    env = {**os.environ, build.ENV_CACHE: str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    available, library = done.stdout.splitlines()[:2]
    assert available.startswith("True"), available
    assert Path(library).is_relative_to(tmp_path)
    assert "compiling the packed binary kernels" in done.stderr and str(tmp_path) in done.stderr
    assert "built in" in done.stderr


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_plan_keeps_the_faster_version(name: str, kernels: build.KernelStatus, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan times every binary conv; an unfused one whose float version is faster switches to it."""
    from bnnslim.runtime import planner

    model, x, binary = binary_example(name, trained_bn=False, batch=1)
    _random_bn(model, seed=6)
    runtime = to_runtime(model)
    assert runtime_plan(runtime).fused
    assert bool(runtime_plan(runtime).packed_inputs) == (name == "vgg11")  # its first binary conv reads bits
    with torch.no_grad():
        before = runtime(x)
    choices = planner.plan_runtime(runtime, x, calls=1, rounds=1, apply=False)
    assert sorted(c.layer for c in choices) == sorted(binary)
    assert all(c.packed_ms > 0 and c.float_ms > 0 for c in choices)
    # float faster everywhere: every layer runs float, fused pairs are undone first (bits would need the kernels)
    monkeypatch.setattr(planner, "_median_ms", lambda fns, calls, rounds: {"packed": 2.0, "float": 1.0})
    choices = {c.layer: c for c in planner.plan_runtime(runtime, x)}
    assert sorted(choices) == sorted(binary)
    for layer_name, c in choices.items():
        assert c.runs == "float" and "float conv 1.000 ms < packed 2.000 ms" in c.why
        layer = runtime.get_submodule(layer_name)
        assert layer.mode == "emulation" and not layer.input_bits and layer.out_thresholds is None
    plan = runtime_plan(runtime)
    assert not plan.fused and set(plan.emulated) == set(binary)
    # fused pairs and inputs packed from real layers (vgg11's first binary conv) are both undone
    fusion = (FusedAway, PackedMaxPool2d, PackSigns, ComputedByPackSigns)
    assert not any(isinstance(m, fusion) for m in runtime.modules())
    with torch.no_grad():
        torch.testing.assert_close(runtime(x), before, rtol=1e-5, atol=1e-5)  # the memory format may differ


def test_plan_keeps_fused_layers_that_win(kernels: build.KernelStatus, monkeypatch: pytest.MonkeyPatch) -> None:
    from bnnslim.runtime import planner

    model, x, _binary = binary_example("vgg11", trained_bn=False, batch=1)
    _random_bn(model, seed=8)
    runtime = to_runtime(model)
    fused = dict(runtime_plan(runtime).fused)
    monkeypatch.setattr(planner, "_median_ms", lambda fns, calls, rounds: {"packed": 1.0, "float": 3.0})
    choices = planner.plan_runtime(runtime, x)
    assert all(c.runs == "packed" and c.why.startswith("packed 3.0x faster") for c in choices)
    assert runtime_plan(runtime).fused == fused


def test_shared_stateless_activation_fuses(isa: str) -> None:
    """torchvision's BasicBlock calls one ReLU module twice: the first use folds into thresholds, the second stays."""
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = binary_conv(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.conv2, self.bn2 = binary_conv(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + x)

    model = Block().eval()
    _random_bn(model, seed=7)
    fused = to_runtime(model)
    assert runtime_plan(fused).fused == {"conv1": "conv2"}
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), to_runtime(model, fuse=False)(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(fused(x), with_emulation(fused)(x))
