"""``bnnslim bench``: CPU latency of an exported model on the packed runtime vs torch.

For a model file written by ``bnnslim export`` (plain or packed), and for every
batch size and thread count asked for, three models run on the same random input
of the file's input shape:

* **float**: the user's original model, built from the model source recorded in
  the file (unpruned, not binarized, fresh weights: latency does not depend on
  the values), as built (NCHW);
* **torch_binary**: the slim binary model as ``bnnslim.load(path)`` gives it,
  binary convs emulated by torch in float;
* **packed**: the slim binary model on bnnslim's XNOR-popcount runtime,
  ``bnnslim.load(path, runtime="packed")``.

Timing: after ``warmup`` calls each, ``repeats`` rounds in which every model runs
once, in turn, so that load from other processes hits all three alike; the
latency is the median over rounds and each speed-up is the median of the
per-round ratios. A second pass of ``repeats`` rounds with forward hooks on every
conv and linear layer (and every packed binary conv) gives the per-layer
breakdown; "other" is the end-to-end median minus the layers' (batch norm,
pooling, activations, memory-format conversions).

The packed model's output is also checked against its own torch emulation
(:func:`bnnslim.runtime.with_emulation`, which must agree bit for bit), and its
largest difference from the torch binary model is reported (a dot product that is
exactly 0 may come out as +-1e-8 in torch's float emulation, and a later sign()
can flip: small differences there are expected).
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnnslim.errors import BnnslimError

#: the three models, in the order they are timed and shown
MODELS = ("float", "torch_binary", "packed")
LABELS = {"float": "float original", "torch_binary": "torch binary (emulation)", "packed": "packed runtime"}
EXPORTED = ("model.bnn.safetensors", "model.safetensors")  # what a run directory's export writes, preferred first


@dataclass
class LayerTiming:
    layer: str
    kind: str  # "binary conv" | "conv" | "linear" | "other"
    ms: dict[str, float | None]  # model -> median milliseconds per call (None: the model lacks the layer)

    @property
    def speedup(self) -> float | None:
        f, p = self.ms.get("float"), self.ms.get("packed")
        return f / p if f and p else None


@dataclass
class BenchPoint:
    batch: int
    threads: int
    latency_ms: dict[str, float]  # model -> median milliseconds per call
    speedup: dict[str, float]  # "packed_vs_float", "packed_vs_torch_binary", "torch_binary_vs_float"
    layers: list[LayerTiming] = field(default_factory=list)


@dataclass
class BenchResult:
    file: Path
    form: str
    model: str
    input_shape: list[int]
    cpu: str
    cores: int
    kernel: str
    fast_popcount: bool
    repeats: int
    warmup: int
    plan: dict[str, Any]
    max_abs_difference: float  # packed vs torch binary, at the first batch size
    matches_emulation: bool  # packed == its own torch emulation, bit for bit
    points: list[BenchPoint] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layer_plan: list[dict[str, Any]] = field(default_factory=list)  # plan_runtime's choices, per binary conv
    compare: dict[str, Any] | None = None  # other engines (--compare), see compare_engines

    def to_json(self) -> dict[str, Any]:
        return {
            "file": str(self.file), "form": self.form, "model": self.model, "input_shape": self.input_shape,
            "machine": {"cpu": self.cpu, "cores": self.cores, "kernel": self.kernel,
                        "fast_popcount": self.fast_popcount, "torch": torch.__version__},
            "repeats": self.repeats, "warmup": self.warmup, "runtime_plan": self.plan,
            "max_abs_difference_packed_vs_torch_binary": self.max_abs_difference,
            "packed_matches_its_emulation": self.matches_emulation,
            "results": [
                {"batch": p.batch, "threads": p.threads, "latency_ms": p.latency_ms, "speedup": p.speedup,
                 "layers": [{"layer": t.layer, "kind": t.kind, "ms": t.ms, "packed_vs_float": t.speedup}
                            for t in p.layers]}
                for p in self.points
            ],
            "layer_plan": self.layer_plan,
            "compare": self.compare,
            "warnings": self.warnings,
        }


def resolve_model_path(path: Path) -> Path:
    """The model file to bench: ``path`` itself, or a run directory's exported model."""
    path = Path(path)
    if path.is_dir():
        from bnnslim.rundir import RunDir

        if not RunDir(path).manifest_path.is_file():
            raise BnnslimError(f"'{path}' is a directory but not a bnnslim run (no manifest.json)",
                               "give a model file from `bnnslim export`, or a run directory")
        RunDir(path).read_manifest()  # a clear error for a damaged manifest
        for name in EXPORTED:
            if (path / name).is_file():
                return path / name
        raise BnnslimError(f"run '{path}' has no exported model ({EXPORTED[0]})",
                           f"run `bnnslim export --run {path}` first, or give a model file")
    return path


def float_original(meta: dict[str, str], model_file: str | Path | None, path: Path,
                   trust_source: bool = False) -> nn.Module:
    """The user's model, from the code that ``bnnslim.load`` would trust for ``path``: unpruned, real-valued."""
    from bnnslim.model_file import model_source_of

    info = json.loads(meta["model"])
    source = model_source_of(path, model_file, trust_source=trust_source)
    torch.manual_seed(0)
    return source.build(num_classes=info.get("num_classes"), in_channels=info.get("in_channels")).eval()


def _timed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a breakdown times, by the name of the layer they compute: convs and linear layers, binary or
    real, also where the packed runtime folded a real one into another call (a stem on the small-conv kernel,
    a first conv computed by the sign packing after it, a classifier in the pooled tail)."""
    from bnnslim.runtime import PackedBinaryConv2d
    from bnnslim.runtime.fuse import ComputedByPackSigns, DirectRealConv, PackSigns
    from bnnslim.runtime.tails import PooledLinear

    named = dict(model.named_modules())
    packers = {m.into: m for m in named.values() if isinstance(m, PackSigns) and m.conv is not None}
    timed: dict[str, nn.Module] = {}
    for name, m in named.items():
        if isinstance(m, (nn.Conv2d, nn.Linear, PackedBinaryConv2d, DirectRealConv)) or \
                (isinstance(m, PooledLinear) and m.weight is not None):
            timed[name] = m
        elif isinstance(m, ComputedByPackSigns) and m.into in packers:
            timed[name] = packers[m.into]
    return timed


def _kind(module: nn.Module) -> str:
    from bnnslim.binary.layers import BinaryConv2d
    from bnnslim.runtime import PackedBinaryConv2d
    from bnnslim.runtime.tails import PooledLinear

    if isinstance(module, (BinaryConv2d, PackedBinaryConv2d)):
        return "binary conv"
    return "linear" if isinstance(module, (nn.Linear, PooledLinear)) else "conv"


def per_layer_times(models: dict[str, nn.Module], x: torch.Tensor, calls: int) -> dict[str, dict[str, float]]:
    """model -> layer -> median seconds per call, from forward pre/post hooks."""
    out: dict[str, dict[str, float]] = {}
    for key, model in models.items():
        samples: dict[str, list[float]] = {}
        started: dict[str, float] = {}
        handles = []
        for name, module in _timed_layers(model).items():
            def pre(_m: nn.Module, _a: Any, name: str = name, started: dict[str, float] = started) -> None:
                started[name] = time.perf_counter()

            def post(_m: nn.Module, _a: Any, _o: Any, name: str = name, started: dict[str, float] = started,
                     samples: dict[str, list[float]] = samples) -> None:
                samples.setdefault(name, []).append(time.perf_counter() - started[name])

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        try:
            with torch.no_grad():
                for _ in range(calls):
                    model(x)
        finally:
            for h in handles:
                h.remove()
        out[key] = {n: statistics.median(v) for n, v in samples.items()}
    return out


def time_round_robin(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int,
                     inner: int = 1) -> dict[str, list[float]]:
    """model -> seconds per call in each of ``repeats`` rounds; each round runs every model ``inner`` times, in turn."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(warmup):
                model(x)
        for _ in range(repeats):
            for key, model in models.items():
                start = time.perf_counter()
                for _ in range(inner):
                    model(x)
                times[key].append((time.perf_counter() - start) / inner)
    return times


def median_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """The median over rounds of ``times[num] / times[den]`` (both sides of each ratio saw the same load)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def bench(path: str | Path, batches: Sequence[int] = (1,), threads: Sequence[int] = (1,), repeats: int = 20,
          warmup: int = 5, model_file: str | Path | None = None, layers: bool = True,
          progress: Callable[[str], None] | None = None, trust_source: bool = False, plan_layers: bool = True,
          compare: bool = False) -> BenchResult:
    """Time the float original, the torch binary model and the packed runtime (module docstring).

    With ``plan_layers`` each packed binary conv is first timed packed and as a
    float conv on its real input shape, and unfused ones where float wins run
    float (:func:`bnnslim.runtime.plan_runtime`). With ``compare`` the float
    original in ONNX Runtime (fp32, int8) and the binary model in Larq Compute
    Engine are timed too, at the first batch size and one thread
    (:func:`compare_engines`).
    """
    from bnnslim.model_file import read_header
    from bnnslim.runtime import available_cores, cpu_model, kernel_status, plan_runtime, runtime_plan, set_threads

    batches, threads = _checked_counts(batches, threads, repeats, warmup)
    say = progress or (lambda _: None)
    file = resolve_model_path(Path(path))
    meta = read_header(file)
    shape = [int(d) for d in json.loads(meta["input_shape"])]
    previous_threads = torch.get_num_threads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = kernel_status()
        models = _bench_models(meta, file, model_file, trust_source)
        try:
            x0 = torch.randn(batches[0], *shape, generator=torch.Generator().manual_seed(0))
            choices = []
            if plan_layers and status.available:
                say("planning (each binary conv packed vs float)")
                set_threads(threads[0])
                choices = [asdict(c) for c in plan_runtime(models["packed"], x0)]
            plan = runtime_plan(models["packed"])
            max_diff, exact = _agreement(models, x0)
            points = _time_points(models, shape, batches, threads, repeats, warmup, layers, say)
            compared = None
            if compare:
                say("timing ONNX Runtime and Larq Compute Engine")
                set_threads(1)
                compared = compare_engines(models, x0, repeats, warmup)
        finally:
            torch.set_num_threads(previous_threads)
    notes = _bench_notes(caught, status, plan, threads, exact)
    info = json.loads(meta["model"])
    return BenchResult(
        file=file, form=meta.get("form", "?"), model=f"{info['source']}:{info['name']}", input_shape=shape,
        cpu=cpu_model(), cores=available_cores(), kernel=status.isa, fast_popcount=status.fast_popcount,
        repeats=repeats, warmup=warmup, plan=asdict(plan), max_abs_difference=max_diff, matches_emulation=exact,
        points=points, warnings=notes, layer_plan=choices, compare=compared)


def _checked_counts(batches: Sequence[int], threads: Sequence[int], repeats: int,
                    warmup: int) -> tuple[list[int], list[int]]:
    """``--batch``/``--threads`` lists (``[1]`` when empty), refused when a count is not positive."""
    batches, threads = list(batches) or [1], list(threads) or [1]
    for what, values in (("--batch", batches), ("--threads", threads)):
        bad = [v for v in values if v < 1]
        if bad:
            raise BnnslimError(f"{what} {bad[0]} is not a positive count", "give 1 or more")
    if repeats < 1:
        raise BnnslimError(f"--repeats {repeats} times nothing", "give 1 or more")
    if warmup < 0:
        raise BnnslimError(f"--warmup {warmup} is negative", "give 0 or more")
    return batches, threads


def _bench_models(meta: dict[str, str], file: Path, model_file: str | Path | None,
                  trust_source: bool) -> dict[str, nn.Module]:
    """The three models timed against each other: float original, torch binary, packed runtime."""
    import bnnslim

    return {
        "float": float_original(meta, model_file, file, trust_source),
        "torch_binary": bnnslim.load(file, model_file, trust_source=trust_source),
        "packed": bnnslim.load(file, model_file, runtime="packed", trust_source=trust_source),
    }


def _agreement(models: dict[str, nn.Module], x: torch.Tensor) -> tuple[float, bool]:
    """Largest |packed - torch binary| on ``x``, and whether packed equals its own emulation exactly."""
    from bnnslim.runtime import with_emulation

    with torch.no_grad():
        y_packed = models["packed"](x)
        y_torch = models["torch_binary"](x)
        y_emul = with_emulation(models["packed"])(x)
    return float((y_packed - y_torch).abs().max()), bool(torch.equal(y_packed, y_emul))


def _time_points(models: dict[str, nn.Module], shape: list[int], batches: list[int], threads: list[int],
                 repeats: int, warmup: int, layers: bool, say: Callable[[str], None]) -> list[BenchPoint]:
    """Median latencies and speed-up ratios at every (batch, threads), round-robin so that noise hits all alike."""
    from bnnslim.runtime import set_threads

    points = []
    for b in batches:
        x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b))
        for t in threads:
            set_threads(t)
            say(f"batch {b}, {t} thread{'s' if t > 1 else ''}")
            times = time_round_robin(models, x, repeats, warmup)
            latency = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            point = BenchPoint(b, t, latency, {
                "packed_vs_float": median_ratio(times, "float", "packed"),
                "packed_vs_torch_binary": median_ratio(times, "torch_binary", "packed"),
                "torch_binary_vs_float": median_ratio(times, "float", "torch_binary"),
            })
            if layers:
                point.layers = _layer_rows(models, per_layer_times(models, x, repeats), latency)
            points.append(point)
    return points


def _bench_notes(caught: list[warnings.WarningMessage], status: Any, plan: Any, threads: list[int],
                 exact: bool) -> list[str]:
    """What the user should know about the numbers: fallbacks, thread oversubscription, missing popcount."""
    from bnnslim.runtime import RuntimeFallbackWarning, ThreadsWarning

    notes: list[str] = []
    for w in caught:
        if issubclass(w.category, RuntimeFallbackWarning):
            continue  # said below, whether or not this process had said it before
        if not issubclass(w.category, ThreadsWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # not ours: pass it on
            continue
        text = " ".join(str(w.message).split())
        if text not in notes:
            notes.append(text)  # --threads above the core count
    emulated = plan.emulated
    if not status.available:
        notes.append(f"the packed kernels are not available ({status.reason}): the packed runtime fell back to "
                     f"torch's emulation for all {len(emulated)} binary convs (correct, but no faster than torch)")
        emulated = {n: r for n, r in emulated.items() if not r.startswith("kernels not available")}
    elif not status.fast_popcount:
        notes.append(f"this CPU has no vector popcount (AVX-512 VPOPCNTDQ or AVX2; kernel: {status.isa}): "
                     "expect small speed-ups from the packed runtime")
    emulated = {n: r for n, r in emulated.items() if not r.startswith("plan:")}  # shown in the plan
    if max(threads) > 1 and os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE":
        notes.append("OpenMP threads spin while they wait, which on a loaded machine makes several threads much "
                     "slower than one: set OMP_WAIT_POLICY=PASSIVE before Python starts (`bnnslim bench` does)")
    for reason, names in _by_reason(emulated).items():
        notes.append(f"the packed runtime fell back to torch's emulation for {_layers(names)}: {reason}")
    for reason, names in _by_reason(plan.unchanged).items():
        notes.append(f"{_layers(names)} not packed (a torch binary conv in the packed model): {reason}")
    if not exact:
        notes.append("the packed runtime's output differs from its own torch emulation: please report this as a bug")
    return notes


COMPARE_CALLS = 10  # calls per engine per round in compare_engines

#: what compare_engines times, as shown
ENGINES = {"ort_fp32:original": "ONNX Runtime fp32 (float original)",
           "ort_int8:original": "ONNX Runtime int8, static (float original)",
           "lce": "Larq Compute Engine (binary model)",
           "lce_indirect_bgemm": "Larq Compute Engine, indirect BGEMM (binary model)"}


def compare_engines(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int) -> dict[str, Any]:
    """The packed model vs ONNX Runtime (float original, fp32 and int8) and LCE (the binary model), interleaved.

    Engines run in worker processes (:mod:`bnnslim.runtime.peers`); one that
    cannot start is listed under ``missing`` with the reason.
    """
    from bnnslim.runtime.peers import start_peers

    with start_peers({"original": models["float"]}, models["torch_binary"], x) as peers, torch.no_grad():
        remote = peers.runners()
        times: dict[str, list[float]] = {"packed": [], **{n: [] for n in remote}}
        for _ in range(warmup):
            models["packed"](x)
        for n, w in remote.items():
            w.time(n, max(1, warmup))
        for r in range(repeats):
            for n in (list(times) if r % 2 == 0 else list(times)[::-1]):
                # several calls per turn: after another process ran, the first call pays for cold caches
                if n == "packed":
                    start = time.perf_counter()
                    for _ in range(COMPARE_CALLS):
                        models["packed"](x)
                    times[n].append((time.perf_counter() - start) / COMPARE_CALLS)
                else:
                    times[n].append(remote[n].time(n, COMPARE_CALLS))
        missing = dict(peers.missing)
    return {"batch": int(x.shape[0]), "threads": 1,
            "latency_ms": {n: statistics.median(t) * 1e3 for n, t in times.items()},
            "packed_speedup": {n: median_ratio(times, n, "packed") for n in remote},
            "missing": missing}


def _by_reason(layers: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name, reason in layers.items():
        grouped.setdefault(reason, []).append(name)
    return grouped


def _layers(names: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"{len(names)} binary conv{'s' if len(names) > 1 else ''} ({shown})"


def _layer_rows(models: dict[str, nn.Module], per_layer: dict[str, dict[str, float]],
                latency_ms: dict[str, float]) -> list[LayerTiming]:
    """One row per timed layer (in the packed model's order, then layers only the float model has), plus "other"."""
    kinds = {n: _kind(m) for n, m in _timed_layers(models["float"]).items()}
    kinds.update({n: _kind(m) for n, m in _timed_layers(models["torch_binary"]).items()})
    names = list(per_layer["packed"]) + [n for k in MODELS for n in per_layer[k] if n not in per_layer["packed"]]
    rows = []
    for name in dict.fromkeys(names):
        ms = {k: (per_layer[k][name] * 1e3 if name in per_layer[k] else None) for k in MODELS}
        rows.append(LayerTiming(name, kinds.get(name, "conv"), ms))
    rows.append(LayerTiming("other", "other", {
        k: max(0.0, latency_ms[k] - sum(v for r in rows if (v := r.ms[k]) is not None)) for k in MODELS}))
    return rows
