"""The engines a user would pick instead, timed beside bnnslim: ONNX Runtime and Larq Compute Engine.

Each engine runs in a worker process (:mod:`bnnslim.runtime.peer_worker`) with
the Python that has it: ``$BNNSLIM_ORT_PYTHON`` / ``$BNNSLIM_LCE_PYTHON`` if set,
else this Python if it imports the engine (``pip install bnnslim[compare]``
gives ONNX Runtime; LCE needs TensorFlow 2.16 and numpy<2, so it usually lives
in a virtualenv of its own). The caller times its own models in-process and
asks the workers for theirs in the same round-robin rounds.

* ONNX Runtime: the float model exported with ``torch.onnx.export``, fp32 and
  int8 (static quantization, QDQ, per-channel weights, calibrated on random
  inputs), one intra-op thread.
* LCE: the same binary architecture rebuilt in larq from :func:`graph_spec`
  (binary convs as ``QuantConv2D`` with ``ste_sign`` inputs and weights, real
  first and last layers), converted by LCE, with and without its indirect BGEMM.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import operator
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

WORKER = Path(__file__).with_name("peer_worker.py")
ENGINES = {"ort": ("onnxruntime", "BNNSLIM_ORT_PYTHON"), "lce": ("larq_compute_engine", "BNNSLIM_LCE_PYTHON")}


def engine_python(engine: str) -> tuple[str | None, str]:
    """The Python that runs ``engine`` and how it was found, or (None, why not)."""
    module, env = ENGINES[engine]
    if os.environ.get(env):
        return os.environ[env], f"${env}"
    if importlib.util.find_spec(module) is not None:
        return sys.executable, "this Python"
    return None, f"{module} is not installed here (pip install it, or point ${env} at a Python that has it)"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from bnnslim.binary.layers import BinaryConv2d

        return isinstance(m, BinaryConv2d) or super().is_leaf_module(m, qualname)


def _pair(v: int | tuple[int, ...]) -> list[int]:
    return [v, v] if isinstance(v, int) else [int(v[0]), int(v[1])]


def graph_spec(model: nn.Module, input_shape: list[int]) -> dict[str, Any]:
    """The layers of a binarized model (BinaryConv2d, conv, BN, Hardtanh/ReLU, pools, linear, add) as plain data.

    Raises ``ValueError`` naming the first layer with no counterpart.
    """
    from bnnslim.binary.layers import BinaryConv2d

    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    nodes: list[dict[str, Any]] = []
    for n in graph.nodes:
        inputs = [a.name for a in n.args if isinstance(a, fx.Node)]
        node: dict[str, Any] = {"name": n.name, "inputs": inputs}
        if n.op == "placeholder":
            node.update(op="input", inputs=[])
        elif n.op == "output":
            continue
        elif n.op == "call_module":
            m = modules[str(n.target)]
            if isinstance(m, nn.Conv2d):
                if isinstance(m.padding, str) or m.padding_mode != "zeros":
                    raise ValueError(f"conv '{n.target}' pads with {m.padding!r}/{m.padding_mode}")
                node.update(op="conv", binary=isinstance(m, BinaryConv2d), out=m.out_channels,
                            kernel=_pair(m.kernel_size), stride=_pair(m.stride), padding=_pair(m.padding),
                            dilation=_pair(m.dilation), groups=m.groups, bias=m.bias is not None)
            elif isinstance(m, nn.BatchNorm2d):
                node.update(op="bn", eps=m.eps)
            elif isinstance(m, nn.Hardtanh):
                node.update(op="hardtanh", min=float(m.min_val), max=float(m.max_val))
            elif isinstance(m, nn.ReLU):
                node.update(op="relu")
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and not getattr(m, "ceil_mode", False):
                node.update(op="maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool", kernel=_pair(m.kernel_size),
                            stride=_pair(m.stride or m.kernel_size), padding=_pair(m.padding))
            elif isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1), [1, 1]):
                node.update(op="gap")
            elif isinstance(m, nn.Flatten):
                node.update(op="flatten")
            elif isinstance(m, nn.Linear):
                node.update(op="linear", out=m.out_features, bias=m.bias is not None)
            elif isinstance(m, (nn.Identity, nn.Dropout)):
                node.update(op="identity")
            else:
                raise ValueError(f"layer '{n.target}' ({type(m).__name__}) has no larq counterpart here")
        elif n.op == "call_function" and n.target in (operator.add, torch.add):
            node.update(op="add")
        elif (n.op == "call_function" and n.target is torch.flatten) or (n.op == "call_method"
                                                                          and n.target in ("flatten", "view")):
            node.update(op="flatten", inputs=inputs[:1])
        else:
            raise ValueError(f"'{n.name}' ({n.op} {n.target}) has no larq counterpart here")
        nodes.append(node)
    return {"input_shape": list(input_shape), "nodes": nodes}


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    """The float model as ONNX (TorchScript exporter, opset 17)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(model.eval(), (x,), str(path), input_names=["input"], output_names=["output"],
                          opset_version=17, dynamo=False)


@dataclass
class Worker:
    engine: str
    process: subprocess.Popen[str]
    names: list[str]

    def time(self, name: str, calls: int) -> float:
        """Seconds per call of ``name`` over ``calls`` calls (the worker runs while this process waits)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"time {name} {calls}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            with contextlib.suppress(OSError):
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass
class Peers:
    """Workers for the engines that could start, and why the others could not."""

    workers: list[Worker] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    folder: tempfile.TemporaryDirectory[str] | None = None

    def runners(self) -> dict[str, Worker]:
        return {name: w for w in self.workers for name in w.names}

    def close(self) -> None:
        for w in self.workers:
            w.close()
        if self.folder is not None:
            self.folder.cleanup()

    def __enter__(self) -> Peers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_peers(float_models: dict[str, nn.Module], binary_model: nn.Module | None, x: torch.Tensor,
                engines: tuple[str, ...] = ("ort", "lce"), env: dict[str, str] | None = None) -> Peers:
    """Start a worker per engine: ORT on each of ``float_models`` (name -> model), LCE on ``binary_model``."""
    peers = Peers(folder=tempfile.TemporaryDirectory(prefix="bnnslim-peers-"))
    assert peers.folder is not None
    root = Path(peers.folder.name)
    g = torch.Generator().manual_seed(1)
    calibration = torch.randn(8, *x.shape[1:], generator=g)
    worker_env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
                  "TF_USE_LEGACY_KERAS": "1",
                  **(env or {})}
    for engine in engines:
        python, how = engine_python(engine)
        if python is None:
            peers.missing[engine] = how
            continue
        spec = root / engine
        spec.mkdir()
        np.save(spec / "input.npy", x.numpy())
        np.save(spec / "calibration.npy", calibration.numpy())
        try:
            if engine == "ort":
                for name, model in float_models.items():
                    export_onnx(model, x, spec / f"{name}.onnx")
            else:
                if binary_model is None:
                    peers.missing[engine] = "no binary model given"
                    continue
                spec_json = graph_spec(binary_model, list(x.shape[1:]))
                (spec / "graph.json").write_text(json.dumps(spec_json), encoding="utf-8")
        except Exception as exc:  # the engine is left out, with the reason
            peers.missing[engine] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        process = subprocess.Popen([python, str(WORKER), engine, str(spec)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=worker_env)
        assert process.stdout is not None
        first = process.stdout.readline().strip()
        if not first.startswith("ready "):
            peers.missing[engine] = first.removeprefix("error ") or "the worker exited without a word"
            process.kill()
            continue
        peers.workers.append(Worker(engine, process, json.loads(first.removeprefix("ready "))))
    return peers
