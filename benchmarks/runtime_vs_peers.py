"""bnnslim's packed runtime vs the engines users would pick instead (issue 13), batch 1, one thread.

For NIN, VGG-11 and ResNet-18 (the examples, CIFAR form 3x32x32), slim at keep
0.5: every prunable conv at half its filters (the examples built at width 0.5:
what uniform keep-0.5 slimming gives), binarized as ``bnnslim binarize`` does
(first and last layers real), batch norms with random statistics and scales of
both signs. One interleaved run times, in round-robin rounds of ``--inner``
calls each:

* torch fp32: the float original (full width, as built) and the slim float model;
* ONNX Runtime 1 thread: both float models exported to ONNX, fp32 and int8
  (static QDQ quantization, per-channel weights);
* Larq Compute Engine: the same slim binary architecture in larq, converted by
  LCE, with and without its indirect BGEMM;
* bnnslim: the slim binary model on the packed runtime, fused (bits between
  binary convs: the default) and unfused (every binary conv back to float).

Ratios are contender time / bnnslim fused time (> 1: bnnslim is faster), the
median of per-round ratios. Each ISA runs in its own process: ``auto`` (this
CPU's best) and ``avx2``: on an AVX-512 CPU whose kernel offers CPUID faulting,
every engine of that run (bnnslim, torch, ONNX Runtime, LCE) sees the CPU
without AVX-512 and VNNI (``cpuid_without_avx512.c``, LD_PRELOADed: they all
pick their kernels from CPUID), which is an AVX2-only CPU of this
microarchitecture as far as software can tell; elsewhere only bnnslim
(``BNNSLIM_RUNTIME_ISA=avx2``) and torch (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``) are held, and the record says so.

    BNNSLIM_ORT_PYTHON=/work/venvs/ort/bin/python BNNSLIM_LCE_PYTHON=/work/venvs/lce/bin/python \\
        python benchmarks/runtime_vs_peers.py          # writes runtime_vs_peers.md beside it

On a CPU without AVX-512, ``auto`` is the AVX2 kernel already: the record for
such a machine is ``--isas auto --out benchmarks/runtime_vs_peers_avx2.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import avx512_hidden, without_avx512_env, write_record  # noqa: E402

#: how each ISA is held where CPUID cannot be masked (bnnslim and torch only)
ISA_ENV = {"auto": {}, "avx2": {"BNNSLIM_RUNTIME_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
                                 "ONEDNN_MAX_CPU_ISA": "AVX2"}}
NETWORKS = ["nin", "vgg11", "resnet18"]
REFERENCE = "bnnslim packed (fused)"
LABELS = {
    "torch_original": "torch fp32 (original)", "torch_slim": "torch fp32 (slim)",
    "ort_fp32:original": "ORT fp32 (original)", "ort_int8:original": "ORT int8 (original)",
    "ort_fp32:slim": "ORT fp32 (slim)", "ort_int8:slim": "ORT int8 (slim)",
    "lce": "LCE (slim binary)", "lce_indirect_bgemm": "LCE indirect BGEMM (slim binary)",
    "unfused": "bnnslim packed (unfused)", "fused": REFERENCE,
}
TARGETS = {"lce_indirect_bgemm": 1.5, "ort_int8:original": 3.0, "ort_int8:slim": 3.0, "torch_original": 8.0}
LIMITS = """## What limits the figures where a target is missed

- The "avx2" section is this CPU with AVX-512 and VNNI hidden from every engine where CPUID faulting allows
  (its first line says which): the same cores, caches and clock as the "auto" section, running each engine's
  AVX2 code. A real AVX2-only CPU is an older core (Zen 3, Skylake client), so its absolute times differ;
  `runtime_vs_peers_avx2.md` is one such run (an older revision).
- AVX2 machines: the XNOR-popcount peak with AVX2 is a third (Zen 5) to three quarters (Zen 4) of AVX-512
  VPOPCNTDQ's (`runtime_popcount_peak*.md`). The AVX2 kernel counts bits by nibble lookups; it splits the
  input words into nibbles once for all output channels and the weights once per layer, and drops the
  zero-input mask where no weight bit meets a zero input: 6 vector operations per channel and word (two of
  them lookups on the two shuffle ports) instead of 9; Harley-Seal inside the conv gave nothing (9-36 words
  per output are too few to amortise its carry-save tree). Its blocks of 4 pixels run in row-major order across
  rows (a 2x2 output is one full block), leave out input words that are padding for all 4 pixels, and count
  a border block as dense (a padding tap's popcount(w) taken off afterwards). Layers with 33-63 input channels
  per group fill part of each 64-bit word and run at that fraction of it; those with at most 32 (ResNet-18's
  first stage at width 0.5, VGG-11's second conv) read two taps of a kernel row from one word
  (`runtime_paired_taps.md`). A conv writing bits or channels-last floats with more than 16 outputs runs a
  second AVX2 kernel instead, nibble tables with output channels in the lanes: one shuffle and one add per
  input nibble and 32 output channels, no horizontal sums, compare masks already in the packed bits' order
  (1.1-1.6x the pixel-lane kernel per layer, 2.8x over 8 input channels, `runtime_avx2_kernels.md`; 1x1
  convs over two words, where the pixel-lane kernel's epilogue cost as much as its popcounts, gain most; the
  three examples 1.2x end to end, `runtime_revisions.md`). It is bound by vector operations (a shuffle, an
  add and a share of a table broadcast per 32 x 4 bit products) and by the loads of each pixel's tables.
  With AVX-512 the VPOPCNTDQ kernel stays: in a per-layer A/B on this Zen 4 (not a record) it was 1.5x the
  nibble tables on 3x3 convs and level on 1x1.
- Batch 1 on a slow, shared VM: a torch call on a small tensor costs 10-50 us whatever its size (a batch
  norm on 256x2x2 about 35 us, a Hardtanh 11-19 us), so every float layer left between binary convs costs
  about as much as a small binary conv. Batch norms after binary and real convs, the clamp activations after
  them, and sign-keeping activations and max pooling before a binary conv are folded (README, "Folded float
  layers"); a real first conv feeding a binary conv (VGG-11's 3->32 3x3, NIN's 3->96 5x5) is computed by
  the sign packing itself, and one read as floats (ResNet's 3->32 3x3 stem) by the same kernel writing
  floats (`runtime_first_conv.md`); a residual add and the activation after it are done by the kernel call of
  the block's last conv as it writes its output; what is left in torch is the tail (global pooling and the
  linear classifier, one call). LCE and
  ONNX Runtime run
  their whole graph in C++ at a few microseconds per op. Python's own cost per layer (a module call and a
  packed layer's input checks, a few microseconds) is gone inside plain `nn.Sequential`s, which run their
  fused chains straight on the kernels (README, "Sequences without module calls": 1.2-1.4x on the examples
  in an A/B), and blocks with their own forward (ResNet's BasicBlock) run a torch.fx-planned graph that
  skips the layers folded away (README, "Blocks with their own forward"); what remains is a module call per
  binary conv reading floats and per block, about 1-2 us each.
- NIN: its real 3->96 5x5 first conv (7.4 M multiply-adds at 32x32) runs at one core's float FMA peak (about
  77 us with AVX-512 and 155 us with AVX2 tiles, `runtime_first_conv.md`: 8 or 16 lanes on 2 FMA units at
  about 3 GHz), about 40 % of NIN's time with AVX2; ONNX Runtime int8 runs it with int8 dot products (VNNI
  on this CPU).
- ONNX Runtime int8 of the *slim* model is a strong contender: the slim float model is already small and
  int8 dot products (VNNI where the CPU has it) make its convs cheap; against int8 of the original model (what
  a user without bnnslim would quantize) the packed runtime is faster. NIN with AVX2 is the closest: on a Zen 4
  EPYC held to AVX2 (2026-12-05) ORT int8 of the slim NIN takes 1.2-1.3 ms and bnnslim 0.37-0.40 ms (0.44-0.50
  before the nibble-table kernel: 2.7x then), of which the real first conv takes 0.16 ms at the FMA peak. The
  lever left there is that first conv in 16-bit integers (vpmaddwd on two taps of a kernel row: 45
  instructions for the 75 multiply-adds of a 5x5 tap set over 3 channels, about 1.6x the FMA loop) with a
  float recount of the outputs whose integer result lies within its error bound of the threshold (12-bit
  inputs and weights keep 75 products in int32 and leave about 0.5-1 % of the outputs to recount, by
  estimate); estimated, not built: about 0.05 ms of NIN's time.
"""


def build_models(name: str) -> tuple[dict[str, object], object, object]:
    """(float models by name, slim binary torch model, input) for one example."""
    import importlib.util

    import torch
    from torch import nn

    from bnnslim.binary.convert import apply_binarization, plan_binarization
    from bnnslim.plugins import get_scheme

    spec = importlib.util.spec_from_file_location(f"example_{name}", HERE.parent / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    original = example.build_model().eval()
    slim = example.build_model(width=0.5).eval()
    x = torch.randn(1, *example.INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    binary = example.build_model(width=0.5)
    binary.load_state_dict(slim.state_dict())
    plan = plan_binarization(binary, x)
    apply_binarization(binary, plan.binary, get_scheme("xnor"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in binary.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return {"original": original, "slim": slim}, binary.eval(), x


def measure(isa: str, rounds: int, inner: int, networks: list[str]) -> dict[str, object]:
    """One process, one ISA: every network's contenders, interleaved."""
    import torch

    from bnnslim.runtime import cpu_flags, cpu_model, kernel_status, runtime_plan, set_threads, to_runtime
    from bnnslim.runtime.peers import start_peers

    warnings.simplefilter("ignore")
    set_threads(1)
    forced = os.environ.get("BNNSLIM_RUNTIME_ISA")
    masked = avx512_hidden()
    kernel = forced or kernel_status().isa
    if masked and (kernel != "avx2" or torch.backends.cpu.get_cpu_capability() != "AVX2"):
        raise SystemExit(f"the CPUID mask did not hold: bnnslim picked {kernel}, torch "
                         f"{torch.backends.cpu.get_cpu_capability()}")
    out: dict[str, object] = {"isa": isa, "kernel": kernel, "cpu": cpu_model(), "masked": masked,
                              "flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "popcnt"))),
                              "networks": {}}
    for name in networks:
        floats, binary, x = build_models(name)
        fused = to_runtime(binary)
        local = {"torch_original": floats["original"], "torch_slim": floats["slim"],
                 "unfused": to_runtime(binary, fuse=False), "fused": fused}
        peers = start_peers(floats, binary, x)  # type: ignore[arg-type]  # (they inherit this process's env)
        with peers, torch.no_grad():
            remote = peers.runners()
            names = list(local) + list(remote)
            times: dict[str, list[float]] = {n: [] for n in names}
            for m in local.values():
                for _ in range(5):
                    m(x)
            for n, w in remote.items():
                w.time(n, 5)
            for r in range(rounds):
                for n in (names if r % 2 == 0 else names[::-1]):
                    if n in local:
                        start = time.perf_counter()
                        for _ in range(inner):
                            local[n](x)
                        times[n].append((time.perf_counter() - start) / inner)
                    else:
                        times[n].append(remote[n].time(n, inner))
            missing = dict(peers.missing)
        plan = runtime_plan(fused)
        out["networks"][name] = {  # type: ignore[index]
            "median_ms": {n: statistics.median(t) * 1e3 for n, t in times.items()},
            "ratio_vs_fused": {n: statistics.median(a / b for a, b in zip(t, times["fused"], strict=True))
                               for n, t in times.items()},
            "fused": len(plan.fused), "binary_convs": len(plan.kernel) + len(plan.emulated),
            "missing": missing,
        }
        print(f"{isa} {name}: done", file=sys.stderr)
    return out


def report(results: list[dict[str, object]], args: argparse.Namespace, seconds: float, load: float) -> str:
    sys.path.insert(0, str(HERE))
    from _common import header

    first = results[0]
    lines = [header("bnnslim's packed runtime vs ONNX Runtime, Larq Compute Engine and torch (batch 1, one thread)"),
             f"- CPU: {first['cpu']}; flags: {', '.join(first['flags'])}",  # type: ignore[arg-type]
             "- models: the examples (3x32x32), slim = every prunable conv at half its filters (width 0.5), binarized "
             "with the xnor scheme (first and last layers real), random batch-norm statistics with scales of both "
             "signs; original = the float example at full width",
             f"- timing: {args.rounds} interleaved round-robin rounds x {args.inner} calls per contender (alternating "
             "order), after 5 warm-up calls; each engine in its own process, one at a time; ratios are medians of "
             "per-round ratios",
             f"- load average (1 min) at start {load:.1f}, at end {os.getloadavg()[0]:.1f} (a 2-core VM shared with "
             f"other engineers' processes); whole run {seconds:.0f} s", ""]
    for res in results:
        lines += [f"## ISA: {res['isa']} (bnnslim kernel `{res['kernel']}`)", ""]
        if res["isa"] != "auto":
            lines += [("Every engine saw this CPU without AVX-512 and VNNI (CPUID masked by "
                       "`cpuid_without_avx512.c`): bnnslim, torch, ONNX Runtime and LCE all ran their AVX2 code."
                       if res.get("masked") else
                       "Only bnnslim and torch were held to AVX2 (CPUID could not be masked: "
                       f"{res.get('unmasked_why', '?')}); ONNX Runtime and LCE kept their AVX-512 and VNNI kernels, "
                       "so the ratios against them are lower bounds for an AVX2-only CPU."), ""]
        lines += ["Contender time / bnnslim fused time (> 1: bnnslim faster):", ""]
        nets = res["networks"]  # type: ignore[assignment]
        cols = [c for c in LABELS if c != "fused" and any(c in nets[n]["ratio_vs_fused"] for n in nets)]
        lines += ["| network | " + " | ".join(LABELS[c] for c in cols) + " |", "|---|" + "---|" * len(cols)]
        for n, r in nets.items():
            cells = []
            for c in cols:
                v = r["ratio_vs_fused"].get(c)
                mark = "" if v is None or c not in TARGETS else (" ok" if v >= TARGETS[c] else f" (<{TARGETS[c]:g})")
                cells.append("-" if v is None else f"{v:.2f}{mark}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", "Median latency (ms):", "", "| network | " + " | ".join(LABELS[c] for c in [*cols, "fused"])
                  + " | binary convs fused |", "|---|" + "---|" * (len(cols) + 2)]
        for n, r in nets.items():
            lines.append(f"| {n} | " + " | ".join(f"{r['median_ms'][c]:.3f}" if c in r["median_ms"] else "-"
                                                  for c in [*cols, "fused"])
                         + f" | {r['fused']} of {r['binary_convs']} |")
        missing = {e: why for r in nets.values() for e, why in r["missing"].items()}
        for e, why in missing.items():
            lines.append(f"\n- {e} not timed: {why}")
        lines.append("")
    lines.append(LIMITS)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="*", default=NETWORKS)
    parser.add_argument("--isas", nargs="*", default=["auto", "avx2"], choices=list(ISA_ENV))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "runtime_vs_peers.md")
    parser.add_argument("--one-isa", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_isa:
        result = measure(args.one_isa, args.rounds, args.inner, args.networks)
        args.json_out.write_text(json.dumps(result), encoding="utf-8")
        return
    started, load = time.perf_counter(), os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for isa in args.isas:
            out = Path(tmp) / f"{isa}.json"
            env, why = ({}, "") if isa == "auto" else without_avx512_env()
            # torch reads its CPU capability when it loads: a fresh process per ISA
            subprocess.run([sys.executable, __file__, "--one-isa", isa, "--json-out", str(out), "--rounds",
                            str(args.rounds), "--inner", str(args.inner), "--networks", *args.networks],
                           env={**os.environ, "OMP_NUM_THREADS": "1", **(env or ISA_ENV[isa])}, check=True)
            results.append({**json.loads(out.read_text(encoding="utf-8")), "unmasked_why": why})
    text = report(results, args, time.perf_counter() - started, load)
    print(text)
    write_record(args.out, text)  # keeps the hand-written notes of the record it replaces


if __name__ == "__main__":
    main()
