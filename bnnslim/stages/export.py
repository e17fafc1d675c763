"""``bnnslim export``: slim the pruned model for real and write deployable files.

1. rebuild the run's binary model with its retrained weights and masks;
2. remove the masked channels with torch-pruning (:func:`bnnslim.prune.slim.slim`);
3. check on a probe batch that the slim model computes what the masked model
   computes (exactly what was trained); nothing is written if it does not, and
   the error names the first layer that diverges;
4. write the plain and/or packed model files (``bnnslim.model_file``), a JSON
   report and a PNG chart of the filters kept per layer (not for ``-o FILE``,
   which writes that one file and leaves the run's report describing its files).

The run directory is locked meanwhile (:mod:`bnnslim.runlock`), and the pruned
weights must be the file the manifest recorded (same sha256).

A run that was never pruned exports its binary model as it is (and says so).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnnslim._atomic import write_json
from bnnslim.checks import dead_model_check
from bnnslim.errors import BnnslimError
from bnnslim.graph import build_graph
from bnnslim.model_file import write_model_file
from bnnslim.plugins import get_dataset, recorded_plugin
from bnnslim.prune.groups import find_groups
from bnnslim.prune.slim import checked_slim
from bnnslim.report import compare, kept_chart, layer_costs
from bnnslim.run_model import load_run_model
from bnnslim.rundir import RunDir, load_tensors
from bnnslim.runlock import run_lock
from bnnslim.trust import ModelArg

FORMATS = ("plain", "packed", "onnx")


@dataclass
class ExportResult:
    files: dict[str, Path]  # form -> path
    sizes: dict[str, int]  # "fp32 original", form -> bytes on disk
    rows: list[dict[str, Any]]
    pruned: bool
    max_difference: float
    accuracy: float | None = None
    report_path: Path | None = None
    chart_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def probe_batch(shape: tuple[int, ...], n: int = 8) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1234))


def export(run_path: Path, forms: tuple[str, ...] = ("plain", "packed"), output: Path | None = None,
           evaluate_data: bool = True, model: ModelArg = None, trust_source: bool = False) -> ExportResult:
    """Slim the run's pruned model and write the requested forms (module docstring).

    ``model`` / ``trust_source``: the model code, for a run this account did not
    make (see :mod:`bnnslim.trust`).
    """
    for form in forms:
        if form not in FORMATS:
            raise BnnslimError(f"unknown format '{form}'", f"choose from {', '.join(FORMATS)}")
    if output is not None and len(forms) != 1:
        raise BnnslimError("-o/--output names one file", "give one --format with it")
    if output is not None and Path(output).is_dir():
        raise BnnslimError(f"-o/--output '{output}' is a directory", "give the path of the file to write")
    run = RunDir(Path(run_path))
    with run_lock(run.path, "export"):
        return _export(run, forms, output, evaluate_data, model, trust_source)


def _export(run: RunDir, forms: tuple[str, ...], output: Path | None, evaluate_data: bool, model_arg: ModelArg,
            trust_source: bool) -> ExportResult:
    manifest = run.read_manifest()
    prune_info = manifest.get("prune")
    notes: list[str] = []
    pruned_path = run.path / prune_info["weights"] if prune_info else None
    if prune_info and pruned_path is not None:
        run.check_weights(pruned_path, prune_info.get("weights_sha256"))
    loaded = load_run_model(run, weights=pruned_path, model=model_arg, trust_source=trust_source)
    model = loaded.model.eval()
    example = probe_batch(loaded.input_shape)
    before = layer_costs(model, example)
    slim_model, max_diff = model, 0.0
    if prune_info:
        tensors = load_tensors(pruned_path)  # type: ignore[arg-type]
        masks = {k[5:]: v for k, v in tensors.items() if k.startswith("mask.")}
        exclude = tuple(prune_info["options"].get("exclude", ()))
        groups = find_groups(model, build_graph(model, example), example, exclude=exclude).groups
        slim_model, max_diff = checked_slim(model, groups, masks, example)
    else:
        notes.append("the run was not pruned: exporting the binary model unslimmed")
    after = layer_costs(slim_model, example)
    rows = compare(before, after)
    accuracy = None
    dataset = (prune_info or {}).get("dataset") or manifest.get("dataset")
    if evaluate_data and dataset:
        from bnnslim.train import evaluate

        root = Path(dataset["root"]) if dataset.get("root") else None
        data = get_dataset(dataset["name"], recorded_plugin(manifest, "dataset")).splits_for(root, loaded.input_shape)
        accuracy = evaluate(slim_model, data.test, torch.device("cpu")).accuracy
    warnings = dead_model_check(slim_model, example, accuracy, manifest["model"].get("num_classes"))
    metrics = {"accuracy": accuracy, "pruned": bool(prune_info),
               "keep": prune_info["keep"] if prune_info else 1.0,
               "strategy": prune_info["strategy"] if prune_info else None}
    files: dict[str, Path] = {}
    for form in forms:
        target = output or run.path / {"plain": "model.safetensors", "packed": "model.bnn.safetensors",
                                       "onnx": "model.onnx"}[form]
        if form == "onnx":
            _write_onnx(slim_model, example, target)
        else:
            write_model_file(target, slim_model, manifest, form, metrics)
        files[form] = target
    sizes = {"fp32 original": run.binary_weights.stat().st_size}
    sizes.update({form: path.stat().st_size for form, path in files.items()})
    result = ExportResult(files=files, sizes=sizes, rows=rows, pruned=bool(prune_info), max_difference=max_diff,
                          accuracy=accuracy, notes=notes, warnings=warnings)
    if output is not None:  # one file elsewhere: the run's report keeps describing the run's own files
        return result
    result.report_path = run.path / "export-report.json"
    write_json(result.report_path, {"files": {k: str(v) for k, v in files.items()}, "sizes_bytes": sizes,
                                    "max_difference_slim_vs_masked": max_diff, "accuracy": accuracy,
                                    "layers": rows, "notes": notes, "warnings": warnings,
                                    "training": _training(manifest),
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    result.chart_path = run.path / "kept-filters.png"
    kept_chart(rows, result.chart_path)
    return result


def _training(manifest: dict[str, Any]) -> dict[str, Any]:
    """Which teacher and which loss trained the exported weights, stage by stage (from the manifest)."""
    binarize, prune = (v if isinstance(v, dict) else {} for v in (manifest.get("binarize"), manifest.get("prune")))
    out: dict[str, Any] = {"binarize": {"loss": binarize.get("loss", "cross-entropy"),
                                        "teacher": manifest.get("teacher"), "two_step": manifest.get("two_step")}}
    if prune:
        out["prune"] = {"strategy": prune.get("strategy"), "keep": prune.get("keep"), "loss": prune.get("loss"),
                        "teacher": prune.get("teacher"), "retrain_steps": prune.get("retrain_steps"),
                        "retrain_scope": prune.get("retrain_scope"), "finetune_steps": prune.get("finetune_steps")}
    return out


def _write_onnx(model: nn.Module, example: torch.Tensor, target: Path) -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise BnnslimError("--format onnx needs the onnx package", "pip install onnx (or bnnslim[onnx])") from exc
    from bnnslim._atomic import atomic_path

    with atomic_path(target) as tmp:
        torch.onnx.export(model, (example[:1],), str(tmp), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


def load_report(run_path: Path) -> dict[str, Any]:
    return json.loads((Path(run_path) / "export-report.json").read_text())
