"""A small real first conv computed by the sign packing vs torch's conv then packing (issue 13).

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
from bnnslim.runtime.fuse import SIGN_CONV_MAX_MACS  # noqa: E402

#: (name, in, out, kernel, stride, padding, input size)
CASES = [
    ("VGG-11 example, 3->32 3x3 at 32x32", 3, 32, 3, 1, 1, 32),
    ("3->64 3x3 at 32x32", 3, 64, 3, 1, 1, 32),
    ("NIN example, 3->96 5x5 at 32x32", 3, 96, 5, 1, 2, 32),
    ("ResNet stem, 3->64 7x7 stride 2 at 64x64", 3, 64, 7, 2, 3, 64),
    ("3->192 5x5 at 32x32", 3, 192, 5, 1, 2, 32),
]
ISA_CODES = {"avx512": 4, "avx2": 3}
TORCH_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def time_case(case: tuple[str, int, int, int, int, int, int], rounds: int, inner: int) -> dict[str, float]:
    """Median microseconds per call of each contender on one case (checked against torch's conv first)."""
    name, cin, cout, k, s, p, hw = case
    ops = build.fast_ops()
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, stride=s, padding=p).eval()
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
        kernel = partial(ops.conv_sign_bits, x, w, b, k, k, [s, s], [p, p], code, False)
        try:
            got = unpack_ternary(kernel(), cout)
        except RuntimeError:  # the CPU lacks the ISA
            continue
        assert torch.equal(got[far], torch.sign(reference)[far]), f"{isa} kernel disagrees with torch on {name}"
        contenders[f"kernel {isa}"] = kernel

    def torch_then_pack() -> torch.Tensor:
        with torch.no_grad():
            return ops.pack_signs(conv(x), 0, False)

    contenders["torch conv + pack"] = torch_then_pack
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
    """Every case, one thread, with this process's torch."""
    torch.set_num_threads(1)
    return [{"case": case[0], "macs_per_pixel": case[1] * case[3] ** 2 * case[2], "us": time_case(case, rounds, inner)}
            for case in CASES]


def table(rows: list[dict[str, object]], kernel: str | None = None) -> str:
    """One row per case; the last column compares torch with ``kernel`` (default: the fastest kernel)."""
    names: list[str] = list(rows[0]["us"])  # type: ignore[call-overload]
    lines = ["| first conv | MACs per output pixel | taken (<= SIGN_CONV_MAX_MACS) | "
             + " | ".join(f"{n} (us)" for n in names) + f" | torch / {kernel or 'best kernel'} |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for row in rows:
        us: dict[str, float] = row["us"]  # type: ignore[assignment]
        best = us[kernel] if kernel else min(v for n, v in us.items() if n.startswith("kernel"))
        taken = "yes" if int(row["macs_per_pixel"]) <= SIGN_CONV_MAX_MACS else "no"  # type: ignore[call-overload]
        lines.append(f"| {row['case']} | {row['macs_per_pixel']} | {taken} | "
                     + " | ".join(f"{us[n]:.1f}" for n in names) + f" | {us['torch conv + pack'] / best:.2f} |")
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
    text = "\n".join([
        header("A small real first conv: computed by the sign packing vs torch's conv then packing (one thread)"),
        f"- rounds: {args.rounds} interleaved rounds x {args.inner} calls per contender, medians; "
        f"SIGN_CONV_MAX_MACS = {SIGN_CONV_MAX_MACS}\n",
        "## torch as installed\n", table(rows), "",
        "## torch held to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`, a separate process)\n",
        table(avx2_rows, "kernel avx2" if "kernel avx2" in avx2_rows[0]["us"] else None),
    ])
    write_record(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
