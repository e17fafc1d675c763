"""Time a model in another engine, in that engine's own Python environment.

Run by :mod:`bnnslim.runtime.peers` as ``PYTHON peer_worker.py ENGINE SPEC_DIR``
with ENGINE one of ``ort`` (ONNX Runtime fp32 and int8) or ``lce`` (Larq
Compute Engine); it imports neither torch nor bnnslim, so any environment with
the engine (and numpy) runs it. Protocol, one line each way over stdin/stdout:
the worker prints ``ready {json: name -> note}`` (or ``error MESSAGE``) once
set up, then answers each ``time NAME CALLS`` with the seconds per call and
``quit`` with nothing. One worker runs at a time (the driver waits for the
answer), so engines in several processes are timed round-robin, interleaved.

``SPEC_DIR`` holds ``input.npy`` (NCHW float32), ``calibration.npy`` and, for
ORT, ``model.onnx``; for LCE, ``graph.json``: the model's layers (see
``peers.graph_spec``), rebuilt in Keras/larq with random weights (latency does
not depend on the values) and converted with LCE's converter.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _ort(spec: Path) -> dict[str, Callable[[], object]]:
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    x = np.load(spec / "input.npy")
    calib = np.load(spec / "calibration.npy")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    class Reader(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.items = iter([{name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

    def runner(session: Any, name: str) -> Callable[[], object]:
        return lambda: session.run(None, {name: x})

    runners: dict[str, Callable[[], object]] = {}
    for onnx_file in sorted(spec.glob("*.onnx")):
        if onnx_file.stem.endswith("_int8"):
            continue
        fp32 = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
        name = fp32.get_inputs()[0].name
        int8_file = onnx_file.with_name(onnx_file.stem + "_int8.onnx")
        quantize_static(str(onnx_file), str(int8_file), Reader(name), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        int8 = ort.InferenceSession(str(int8_file), opts, providers=["CPUExecutionProvider"])
        runners[f"ort_fp32:{onnx_file.stem}"] = runner(fp32, name)
        runners[f"ort_int8:{onnx_file.stem}"] = runner(int8, name)
    return runners


def _keras(graph: list[dict[str, Any]], input_shape: list[int]) -> Any:
    import larq as lq
    import tensorflow as tf

    layers = tf.keras.layers
    values: dict[str, Any] = {}
    inp = layers.Input(shape=(input_shape[1], input_shape[2], input_shape[0]), batch_size=1)
    for node in graph:
        op, args = node["op"], [values[a] for a in node["inputs"]]
        if op == "input":
            out = inp
        elif op == "conv":
            x = args[0]
            pad = node["padding"]
            if any(pad):
                x = layers.ZeroPadding2D(((pad[0], pad[0]), (pad[1], pad[1])))(x)
            common = {"filters": node["out"], "kernel_size": node["kernel"], "strides": node["stride"],
                      "dilation_rate": node["dilation"], "use_bias": node["bias"], "padding": "valid"}
            if node["groups"] != 1:
                common["groups"] = node["groups"]
            if node["binary"]:
                out = lq.layers.QuantConv2D(input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                                            kernel_constraint="weight_clip", **common)(x)
            else:
                out = layers.Conv2D(**common)(x)
        elif op == "bn":
            out = layers.BatchNormalization(epsilon=node["eps"])(args[0])
        elif op == "hardtanh":
            out = layers.ReLU(max_value=node["max"], threshold=node["min"], negative_slope=0.0)(args[0]) \
                if node["min"] == 0 else layers.Lambda(lambda t, a=node["min"], b=node["max"]:
                                                       tf.clip_by_value(t, a, b))(args[0])
        elif op == "relu":
            out = layers.ReLU()(args[0])
        elif op in ("maxpool", "avgpool"):
            x = args[0]
            pad = node["padding"]
            if any(pad):
                fill = -1e30 if op == "maxpool" else 0.0
                x = layers.Lambda(lambda t, p=pad, f=fill: tf.pad(t, [[0, 0], [p[0], p[0]], [p[1], p[1]], [0, 0]],
                                                                   constant_values=f))(x)
            cls = layers.MaxPool2D if op == "maxpool" else layers.AveragePooling2D
            out = cls(pool_size=node["kernel"], strides=node["stride"], padding="valid")(x)
        elif op == "gap":
            out = layers.GlobalAveragePooling2D()(args[0])
        elif op == "flatten":
            out = layers.Flatten()(args[0])
        elif op == "linear":
            out = layers.Dense(node["out"], use_bias=node["bias"])(args[0])
        elif op == "add":
            out = layers.Add()(args)
        elif op == "identity":
            out = args[0]
        else:
            raise ValueError(f"layer kind {op!r} has no Keras counterpart here")
        values[node["name"]] = out
    return tf.keras.Model(inp, values[graph[-1]["name"]])


def _lce(spec: Path) -> dict[str, Callable[[], object]]:
    import numpy as np

    x = np.load(spec / "input.npy").transpose(0, 2, 3, 1).copy()
    graph = json.loads((spec / "graph.json").read_text(encoding="utf-8"))
    import larq_compute_engine as lce
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    model = _keras(graph["nodes"], graph["input_shape"])
    flatbuffer = lce.convert_keras_model(model)
    def runner(interp: Any) -> Callable[[], object]:
        return lambda: interp.predict(x)

    runners: dict[str, Callable[[], object]] = {}
    for indirect in (False, True):
        interp = Interpreter(flatbuffer, num_threads=1, use_indirect_bgemm=indirect)
        runners["lce_indirect_bgemm" if indirect else "lce"] = runner(interp)
    return runners


def main() -> None:
    engine, spec = sys.argv[1], Path(sys.argv[2])
    try:
        runners = _ort(spec) if engine == "ort" else _lce(spec)
        for run in runners.values():
            run()
    except Exception as exc:
        print(f"error {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
        return
    print("ready " + json.dumps(sorted(runners)), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "quit":
            return
        run, calls = runners[parts[1]], int(parts[2])
        start = time.perf_counter()
        for _ in range(calls):
            run()
        print(f"{(time.perf_counter() - start) / calls!r}", flush=True)


if __name__ == "__main__":
    main()
