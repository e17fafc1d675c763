"""A small real first conv computed by bnnslim's kernel vs torch's conv (issue 13).

Where a real conv with few inputs (an image's first conv) feeds a fused binary
chain through a sign-keeping layer, ``to_runtime`` lets the packing layer
compute the conv itself (``conv_sign_bits``: the signs of ``conv(x) + b`` as
bits, no float output written) instead of torch's conv followed by
``pack_signs``. This measures both on the first convs of common networks,
batch 1, one thread, interleaved rounds (median per contender), with the
kernel's AVX-512 and AVX2 tiles, and then again in a process whose torch is
held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``), as on a
machine without AVX-512. ``SIGN_CONV_MAX_MACS`` (bnnslim/runtime/fuse.py)
takes the convs this shows the kernel winning.

A second table measures the same kernel writing floats (``conv_small_float``:
``clamp(conv(x) + b)``, the runtime's ``DirectRealConv`` for a first conv whose
output is read as floats, as ResNet's stem is) against torch's conv then
Hardtanh, both channels-last; ``SMALL_CONV_MAX_MACS`` takes the convs it wins.

    python benchmarks/runtime_first_conv.py        # writes runtime_first_conv.md beside it
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import header, write_record  # noqa: E402

from bnnslim.runtime import build  # noqa: E402
from bnnslim.runtime.bits import unpack_ternary  # noqa: E402
from bnnslim.runtime.fuse import SIGN_CONV_MAX_MACS, SMALL_CONV_MAX_MACS  # noqa: E402

#: (name, in, out, kernel, stride, padding, input size)
CASES = [
    ("VGG-11 example, 3->32 3x3 at 32x32", 3, 32, 3, 1, 1, 32),
    ("3->64 3x3 at 32x32", 3, 64, 3, 1, 1, 32),
    ("3->24 5x5 at 32x32", 3, 24, 5, 1, 2, 32),
    ("3->48 5x5 at 32x32", 3, 48, 5, 1, 2, 32),
    ("NIN example, 3->96 5x5 at 32x32", 3, 96, 5, 1, 2, 32),
    ("ResNet stem, 3->64 7x7 stride 2 at 64x64", 3, 64, 7, 2, 3, 64),
    ("3->192 5x5 at 32x32", 3, 192, 5, 1, 2, 32),
]
ISA_CODES = {"avx512": 4, "avx2": 3}
TORCH = {False: "torch conv + pack", True: "torch conv + Hardtanh"}  # the contender for bits, for floats
TORCH_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def time_case(case: tuple[str, int, int, int, int, int, int], rounds: int, inner: int,
              floats: bool = False) -> dict[str, float]:
    """Median microseconds per call of each contender on one case (checked against torch's conv first): signs as
    bits, or (``floats``) the clamped floats."""
    name, cin, cout, k, s, p, hw = case
    ops = build.fast_ops()
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, stride=s, padding=p).eval().to(memory_format=torch.channels_last)
    act = torch.nn.Hardtanh()
    x = torch.randn(1, cin, hw, hw).contiguous(memory_format=torch.channels_last)
    cp = -(-cout // 8) * 8
    w = torch.zeros(k, k, cin, cp)
    w[..., :cout] = conv.weight.detach().permute(2, 3, 1, 0)
    b = torch.zeros(cp)
    assert conv.bias is not None
    b[:cout] = conv.bias.detach()
    with torch.no_grad():
        reference = conv(x)
    far = reference.abs() > 1e-4
    contenders: dict[str, Callable[[], torch.Tensor]] = {}
    for isa, code in ISA_CODES.items():
        if floats:
            kernel = partial(ops.conv_small_float, x, w, b, k, k, [s, s], [p, p], code, cout, -1.0, 1.0)
        else:
            kernel = partial(ops.conv_sign_bits, x, w, b, k, k, [s, s], [p, p], code, False)
        try:
            out = kernel()
        except RuntimeError:  # the CPU lacks the ISA
            continue
        if floats:
            torch.testing.assert_close(out, act(reference), rtol=1e-5, atol=1e-5)
        else:
            got = unpack_ternary(out, cout)
            assert torch.equal(got[far], torch.sign(reference)[far]), f"{isa} kernel disagrees with torch on {name}"
        contenders[f"kernel {isa}"] = kernel

    def torch_then_pack() -> torch.Tensor:
        with torch.no_grad():
            return ops.pack_signs(conv(x), 0, False, None, None)

    def torch_then_clamp() -> torch.Tensor:
        with torch.no_grad():
            return act(conv(x))

    contenders[TORCH[floats]] = torch_then_clamp if floats else torch_then_pack
    times: dict[str, list[float]] = {c: [] for c in contenders}
    for r in range(rounds):
        for c in (list(contenders) if r % 2 == 0 else list(reversed(contenders))):
            contenders[c]()
            start = time.perf_counter()
            for _ in range(inner):
                contenders[c]()
            times[c].append((time.perf_counter() - start) / inner * 1e6)
    return {c: sorted(v)[len(v) // 2] for c, v in times.items()}


def measure(rounds: int, inner: int) -> list[dict[str, object]]:
    """Every case, one thread, with this process's torch: bits, then floats."""
    torch.set_num_threads(1)
    return [{"case": case[0], "macs_per_pixel": case[1] * case[3] ** 2 * case[2], "floats": floats,
             "us": time_case(case, rounds, inner, floats)} for floats in (False, True) for case in CASES]


def table(rows: list[dict[str, object]], floats: bool, kernel: str | None = None) -> str:
    """One row per case; the last column compares torch with ``kernel`` (default: the fastest kernel)."""
    rows = [r for r in rows if r["floats"] is floats]
    names: list[str] = list(rows[0]["us"])  # type: ignore[call-overload]
    limit = ("SMALL_CONV_MAX_MACS", SMALL_CONV_MAX_MACS) if floats else ("SIGN_CONV_MAX_MACS", SIGN_CONV_MAX_MACS)
    lines = [f"| first conv | MACs per output pixel | taken (<= {limit[0]}) | "
             + " | ".join(f"{n} (us)" for n in names) + f" | torch / {kernel or 'best kernel'} |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for row in rows:
        us: dict[str, float] = row["us"]  # type: ignore[assignment]
        best = us[kernel] if kernel else min(v for n, v in us.items() if n.startswith("kernel"))
        taken = "yes" if int(row["macs_per_pixel"]) <= limit[1] else "no"  # type: ignore[call-overload]
        lines.append(f"| {row['case']} | {row['macs_per_pixel']} | {taken} | "
                     + " | ".join(f"{us[n]:.1f}" for n in names) + f" | {us[TORCH[floats]] / best:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON (used for the AVX2 run)")
    parser.add_argument("--out", type=Path, default=HERE / "runtime_first_conv.md")
    args = parser.parse_args(argv)
    rows = measure(args.rounds, args.inner)
    if args.json:
        print(json.dumps(rows))
        return
    held = subprocess.run([sys.executable, __file__, "--json", "--rounds", str(args.rounds), "--inner",
                           str(args.inner)], env={**os.environ, **TORCH_AVX2}, capture_output=True, text=True,
                          check=True)
    avx2_rows = json.loads(held.stdout.strip().splitlines()[-1])
    avx2 = "kernel avx2" if "kernel avx2" in avx2_rows[0]["us"] else None
    text = "\n".join([
        header("A small real first conv: bnnslim's kernel vs torch's conv (one thread)"),
        f"- rounds: {args.rounds} interleaved rounds x {args.inner} calls per contender, medians; "
        f"SIGN_CONV_MAX_MACS = {SIGN_CONV_MAX_MACS}, SMALL_CONV_MAX_MACS = {SMALL_CONV_MAX_MACS}\n",
        "## Signs as bits (into a fused chain): torch as installed\n", table(rows, False), "",
        "## Signs as bits: torch held to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`, a separate "
        "process)\n", table(avx2_rows, False, avx2), "",
        "## Floats, clamped (a first conv read as floats): torch as installed\n", table(rows, True), "",
        "## Floats, clamped: torch held to AVX2\n", table(avx2_rows, True, avx2),
    ])
    write_record(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
