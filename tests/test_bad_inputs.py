"""A catalogue of bad inputs across every command and the Python API.

Each case is one real, distinct bad input. For a command it asserts: exit code 1,
exactly one ``error:`` line, no traceback (and no exception escaping the
command), and that every file present before is unchanged (a command may only
add the lock file beside a run directory). For ``bnnslim.load`` it asserts that
only :class:`BnnslimError` is raised and nothing is written.
"""

from __future__ import annotations

import json
import pickle
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _helpers import BUNDLED, SMALL_CNN
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import bnnslim
from bnnslim.cli.app import app
from bnnslim.errors import BnnslimError
from bnnslim.stages.binarize import BinarizeOptions, binarize
from bnnslim.stages.export import export
from bnnslim.stages.prune import PruneOptions, prune
from bnnslim.train import TrainConfig

QUICK_PRUNE = ("--select-steps", "1", "--retrain-steps", "1", "--finetune-steps", "0", "--batch-size", "16")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with net.py (the small CNN) and run/: trained, pruned and exported."""
    root = tmp_path_factory.mktemp("base")
    (root / "net.py").write_text(SMALL_CNN.read_text())
    run = root / "run"
    binarize(BinarizeOptions(model=f"{root / 'net.py'}:tiny", run=run, data=BUNDLED,
                             train=TrainConfig(epochs=1, steps_per_epoch=2, batch_size=16)))
    prune(run, PruneOptions(keep=0.6, strategy="random", select_steps=1, retrain_steps=1, batch_size=16, heldout=32))
    export(run, ("plain", "packed"), evaluate_data=False)
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ helpers that make bad inputs


def write(rel: str, content: str | bytes) -> Callable[[Path], None]:
    def make(w: Path) -> None:
        path = w / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else textwrap.dedent(content).lstrip().encode())
    return make


def model_file(body: str, rel: str = "bad.py") -> Callable[[Path], None]:
    return write(rel, "from torch import nn\nimport sys\n" + textwrap.dedent(body).lstrip())


GOOD_NET = """
    class Net(nn.Module):
        def __init__(self, num_classes=10, in_channels=1):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(),
                                   nn.Conv2d(8, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        def forward(self, x):
            return {out}
    INPUT_SHAPE = (1, 28, 28)
"""


def edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def make(w: Path) -> None:
        path = w / "run" / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    return make


def setitem(path: str, value: object) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return change


def delitem(path: str) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        del d[last]
    return change


def edit_header(rel: str, key: str, value: str | None) -> Callable[[Path], None]:
    """Rewrite one metadata field of an exported model file (None: remove it)."""
    def make(w: Path) -> None:
        path = w / rel
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
        meta.pop(key, None)
        if value is not None:
            meta[key] = value
        save_file(tensors, str(path), metadata=meta)
    return make


def edit_tensors(rel: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def make(w: Path) -> None:
        path = w / rel
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
        change(tensors)
        save_file(tensors, str(path), metadata=meta)
    return make


def truncate(rel: str, keep: int) -> Callable[[Path], None]:
    def make(w: Path) -> None:
        path = w / rel
        path.write_bytes(path.read_bytes()[:keep])
    return make


def chain(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(w: Path) -> None:
        for step in steps:
            step(w)
    return make


def nothing(_w: Path) -> None:
    pass


def swap_pruned_with_another_run(w: Path) -> None:
    other = w / "other"
    shutil.copytree(w / "run", other)
    prune(other, PruneOptions(keep=0.4, strategy="random", select_steps=1, retrain_steps=1, batch_size=16,
                              heldout=32))
    shutil.copy(other / "pruned.safetensors", w / "run" / "pruned.safetensors")


def own_run_of(rel_model: str, body: str) -> Callable[[Path], None]:
    """A convert-only run (no data) of a model file in the work folder."""
    def make(w: Path) -> None:
        model_file(body, rel_model)(w)
        binarize(BinarizeOptions(model=str(w / rel_model), run=w / "own"))
    return make


class EvilPickle:
    def __reduce__(self):
        return (print, ("pwned",))


def evil_pt(w: Path) -> None:
    (w / "evil.pt").write_bytes(pickle.dumps({"state": EvilPickle()}))


M = "{w}/net.py:tiny"  # the good model file
R = "{w}/run"

# id -> (make the bad input, command line with {w} for the work folder, words the error must contain)
CLI_CASES: dict[str, tuple[Callable[[Path], None], list[str], list[str]]] = {
    # -------------------------------------------------------------- binarize: the model file
    "binarize-missing-file": (nothing, ["binarize", "{w}/nope.py"], ["not found"]),
    "binarize-directory-as-model": (nothing, ["binarize", "{w}/run"], ["is a directory"]),
    "binarize-pyc": (write("m.pyc", b"\x00\x01"), ["binarize", "{w}/m.pyc"], ["not a Python source file"]),
    "binarize-so": (write("m.so", b"\x7fELF"), ["binarize", "{w}/m.so"], ["not a Python source file"]),
    "binarize-null-bytes": (write("nul.py", b"x = 1\x00\n"), ["binarize", "{w}/nul.py"], ["not Python source"]),
    "binarize-syntax-error": (model_file("def build_model(:\n"), ["binarize", "{w}/bad.py"], ["syntax error", "line"]),
    "binarize-import-error": (model_file("import no_such_module_q\n"), ["binarize", "{w}/bad.py"],
                              ["ModuleNotFoundError"]),
    "binarize-exception-at-import": (model_file("raise ValueError('boom')\n"), ["binarize", "{w}/bad.py"],
                                     ["boom", "bad.py line"]),
    "binarize-sys-exit-at-import": (model_file("sys.exit(3)\n"), ["binarize", "{w}/bad.py"], ["sys.exit(3)"]),
    "binarize-sys-exit-in-build": (model_file("INPUT_SHAPE = (1, 8, 8)\ndef build_model():\n    sys.exit('no')\n"),
                                   ["binarize", "{w}/bad.py"], ["sys.exit('no')"]),
    "binarize-no-model": (model_file("x = 1\n"), ["binarize", "{w}/bad.py"], ["no model found"]),
    "binarize-several-models": (model_file("class A(nn.Linear):\n    def __init__(self): super().__init__(2, 2)\n"
                                           "class B(A): pass\n"), ["binarize", "{w}/bad.py"], ["several models"]),
    "binarize-name-missing-lists-candidates": (model_file("def make_a(): return nn.Linear(2, 2)\n"
                                                          "def make_b(): return nn.Linear(2, 2)\n"),
                                               ["binarize", "{w}/bad.py:nosuch"], ["has no 'nosuch'", "make_a"]),
    "binarize-name-not-a-model": (model_file("depth = 3\n"), ["binarize", "{w}/bad.py:depth"], ["not a model"]),
    "binarize-factory-returns-int": (model_file("INPUT_SHAPE = (1, 8, 8)\ndef build_model(): return 3\n"),
                                     ["binarize", "{w}/bad.py"], ["returned int"]),
    "binarize-factory-raises": (model_file("INPUT_SHAPE = (1, 8, 8)\ndef build_model(): raise KeyError('cfg')\n"),
                                ["binarize", "{w}/bad.py"], ["KeyError"]),
    "binarize-forward-tuple": (model_file(GOOD_NET.format(out="(self.a(x), self.a(x))")),
                               ["binarize", "{w}/bad.py", "--data", BUNDLED], ["returns a tuple"]),
    "binarize-forward-dict": (model_file(GOOD_NET.format(out="{'logits': self.a(x)}")),
                              ["binarize", "{w}/bad.py", "--data", BUNDLED], ["returns a dict"]),
    "binarize-forward-list": (model_file(GOOD_NET.format(out="[self.a(x)]")), ["binarize", "{w}/bad.py"],
                              ["returns a list"]),
    "binarize-forward-4d": (model_file(GOOD_NET.format(out="self.a[:7](x)")), ["binarize", "{w}/bad.py"],
                            ["[batch, classes]"]),
    "binarize-forward-int-tensor": (model_file(GOOD_NET.format(out="self.a(x).long()")), ["binarize", "{w}/bad.py"],
                                    ["[batch, classes]"]),
    "binarize-bad-input-shape-in-file": (model_file("INPUT_SHAPE = 'big'\ndef build_model(): return nn.Linear(2, 2)\n"),
                                         ["binarize", "{w}/bad.py"], ["INPUT_SHAPE"]),
    "binarize-model-rejects-shape": (model_file("def build_model():\n    return nn.Sequential(nn.Conv2d(1, 4, 3), "
                                                "nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 24 * 24, 10))\n"),
                                     ["binarize", "{w}/bad.py", "--input-shape", "1,5,5"], ["rejects inputs"]),
    # -------------------------------------------------------------- binarize: options and data
    "binarize-unknown-dataset": (nothing, ["binarize", M, "--data", "nosuch-data"], ["unknown dataset"]),
    "binarize-unknown-scheme": (nothing, ["binarize", M, "--scheme", "nosuch"], ["unknown scheme"]),
    "binarize-input-shape-text": (nothing, ["binarize", M, "--input-shape", "abc"], ["bad input shape"]),
    "binarize-input-shape-zero": (nothing, ["binarize", M, "--input-shape", "0,28,28"], ["bad input shape"]),
    "binarize-input-shape-huge": (nothing, ["binarize", M, "--input-shape", "1,200000,200000"], ["out of memory"]),
    "binarize-channels-differ-from-data": (nothing, ["binarize", M, "--data", BUNDLED, "--input-shape", "3,28,28",
                                                     "--run", "{w}/r2"], ["gives inputs of shape 1x28x28"]),
    "binarize-real-pattern-matches-nothing": (nothing, ["binarize", M, "--real", "nosuch*"], ["matches no conv"]),
    "binarize-unknown-model-source": (nothing, ["binarize", "nosuchzoo:net"], ["not a model source"]),
    "binarize-unknown-torchvision-model": (nothing, ["binarize", "torchvision:resnet19"], ["no model 'resnet19'"]),
    "binarize-resume-damaged-checkpoint": (lambda w: (
        binarize(BinarizeOptions(model=f"{w}/net.py:tiny", run=w / "t", data=BUNDLED,
                                 train=TrainConfig(epochs=1, steps_per_epoch=1, batch_size=8))),
        truncate("t/checkpoints/train.safetensors", 100)(w)),
        ["binarize", M, "--run", "{w}/t", "--data", BUNDLED, "--resume", "--epochs", "1", "--steps-per-epoch", "1",
         "--batch-size", "8"], ["checkpoint", "is damaged", "without --resume"]),
    "binarize-resume-nothing": (nothing, ["binarize", M, "--data", BUNDLED, "--resume", "--run", "{w}/fresh"],
                                ["nothing to resume"]),
    "binarize-replaces-trained-run": (nothing, ["binarize", M, "--run", R], ["already holds a trained"]),
    "binarize-run-is-a-file": (write("afile", "x"), ["binarize", M, "--run", "{w}/afile"], ["is a file"]),
    "binarize-run-not-a-run": (write("stuff/x.txt", "x"), ["binarize", M, "--run", "{w}/stuff"],
                               ["not a bnnslim run directory"]),
    "binarize-weights-missing": (nothing, ["binarize", M, "--weights", "{w}/nope.safetensors", "--run", "{w}/r3"],
                                 ["not found"]),
    "binarize-weights-malicious-pt": (evil_pt, ["binarize", M, "--weights", "{w}/evil.pt", "--run", "{w}/r3"],
                                      ["weights-only"]),
    "binarize-weights-not-a-checkpoint": (write("w.bin", b"x"), ["binarize", M, "--weights", "{w}/w.bin",
                                                                 "--run", "{w}/r3"], ["could not be read"]),
    "binarize-weights-wrong-model": (lambda w: save_file({"x": torch.zeros(2)}, str(w / "o.safetensors")),
                                     ["binarize", M, "--weights", "{w}/o.safetensors", "--run", "{w}/r3"],
                                     ["do not fit"]),
    "binarize-weights-truncated": (lambda w: (w / "t.safetensors").write_bytes(b"\x10\x00\x00\x00"),
                                   ["binarize", M, "--weights", "{w}/t.safetensors", "--run", "{w}/r3"],
                                   ["safetensors"]),
    # -------------------------------------------------------------- the run directory's manifest (info, prune, export)
    "info-no-run": (nothing, ["info", "--run", "{w}/none"], ["no bnnslim run"]),
    "info-dir-without-manifest": (write("empty/x", "x"), ["info", "{w}/empty"], ["no bnnslim run"]),
    "info-manifest-not-json": (write("run/manifest.json", "{nope"), ["info", "--run", R], ["not valid JSON"]),
    "info-manifest-not-utf8": (write("run/manifest.json", b"\xff\xfe{\x00"), ["info", "--run", R], ["not valid JSON"]),
    "info-manifest-empty": (write("run/manifest.json", b""), ["info", "--run", R], ["not valid JSON"]),
    "info-manifest-a-list": (write("run/manifest.json", "[]"), ["info", "--run", R], ["not a bnnslim manifest"]),
    "info-manifest-other-tool": (write("run/manifest.json", '{"format": "x"}'), ["info", "--run", R],
                                 ["not a bnnslim manifest"]),
    "info-manifest-no-model": (edit_manifest(delitem("model")), ["info", "--run", R], ["no valid model entry"]),
    "info-manifest-sha-null": (edit_manifest(setitem("model.sha256", None)), ["info", "--run", R],
                               ["no valid sha256"]),
    "info-manifest-sha-short": (edit_manifest(setitem("model.sha256", "abc")), ["info", "--run", R],
                                ["no valid sha256"]),
    "info-manifest-name-code": (edit_manifest(setitem("model.name", "os.system('x')")), ["info", "--run", R],
                                ["not a Python identifier"]),
    "info-manifest-source-empty": (edit_manifest(setitem("model.source", "")), ["info", "--run", R],
                                   ["no model source"]),
    "info-manifest-num-classes": (edit_manifest(setitem("model.num_classes", -3)), ["info", "--run", R],
                                  ["not a positive count"]),
    "info-manifest-no-layers": (edit_manifest(delitem("layers")), ["info", "--run", R], ["binary layers"]),
    "info-manifest-unknown-layer": (edit_manifest(setitem("layers.binary", ["nosuch.layer"])), ["info", "--run", R],
                                    ["nosuch.layer"]),
    "info-manifest-layer-not-conv": (edit_manifest(setitem("layers.binary", ["8"])), ["info", "--run", R],
                                     ["has no Conv2d"]),
    "info-manifest-no-scheme": (edit_manifest(delitem("scheme")), ["info", "--run", R], ["scheme"]),
    "info-manifest-unknown-scheme": (edit_manifest(setitem("scheme", "nosuch")), ["info", "--run", R],
                                     ["unknown scheme"]),
    "info-manifest-shape-text": (edit_manifest(setitem("input_shape", "1x28x28")), ["info", "--run", R],
                                 ["input shape"]),
    "info-manifest-shape-negative": (edit_manifest(setitem("input_shape", [1, -28, 28])), ["info", "--run", R],
                                     ["input shape"]),
    "info-manifest-shape-huge": (edit_manifest(setitem("input_shape", [3, 60000, 60000])), ["info", "--run", R],
                                 ["input shape"]),
    "info-manifest-foreign-source": (lambda w: edit_manifest(setitem("model.source", str(w / "net.py")))(w),
                                     ["info", "--run", R], ["no valid signature"]),
    "info-manifest-source-gone": (edit_manifest(setitem("model.source", "/tmp/x/evil.py")), ["info", "--run", R],
                                  ["no longer exists"]),
    "info-manifest-unknown-plugin-source": (edit_manifest(setitem("model.source", "nosuchzoo")),
                                            ["info", "--run", R], ["no installed plugin"]),
    "info-binary-weights-damaged": (truncate("run/binary.safetensors", 40), ["info", "--run", R],
                                    ["does not belong to run"]),
    "info-binary-weights-missing": (lambda w: (w / "run" / "binary.safetensors").unlink(), ["info", "--run", R],
                                    ["not found"]),
    "info-model-flag-wrong-file": (model_file("def build_model(): return nn.Linear(2, 2)\n"),
                                   ["info", "--run", R, "--model", "{w}/bad.py"], ["changed since"]),
    "prune-no-run": (nothing, ["prune", "--keep", "0.5", "--run", "{w}/none"], ["no bnnslim run"]),
    "prune-manifest-not-json": (write("run/manifest.json", "{"), ["prune", "--keep", "0.5", "--run", R],
                                ["not valid JSON"]),
    "prune-manifest-unknown-layer": (edit_manifest(setitem("layers.binary", ["zz"])),
                                     ["prune", "--keep", "0.5", "--run", R], ["zz"]),
    "prune-manifest-foreign-source": (lambda w: edit_manifest(setitem("model.source", str(w / "net.py")))(w),
                                      ["prune", "--keep", "0.5", "--run", R], ["no valid signature"]),
    "prune-keep-zero": (nothing, ["prune", "--keep", "0", "--run", R, *QUICK_PRUNE], ["keep"]),
    "prune-keep-above-one": (nothing, ["prune", "--keep", "1.5", "--run", R, *QUICK_PRUNE], ["keep"]),
    "prune-round-to-above-every-layer": (nothing, ["prune", "--keep", "0.5", "--round-to", "1000", "--run", R,
                                                   *QUICK_PRUNE], ["--round-to 1000", "lower --round-to"]),
    "prune-unknown-strategy": (nothing, ["prune", "--keep", "0.5", "--strategy", "nosuch", "--run", R],
                               ["unknown strategy"]),
    "prune-unknown-dataset": (nothing, ["prune", "--keep", "0.5", "--data", "nosuch", "--run", R],
                              ["unknown dataset"]),
    "prune-binary-weights-replaced": (edit_tensors("run/binary.safetensors", lambda t: t.update(
        {k: v + 1 for k, v in t.items() if v.is_floating_point()})), ["prune", "--keep", "0.5", "--run", R],
        ["does not belong to run"]),
    "prune-resume-checkpoint-without-records": (
        lambda w: (w / "run" / "checkpoints").mkdir(exist_ok=True) or save_file(
            {"model.x": torch.zeros(1)}, str(w / "run" / "checkpoints" / "prune.safetensors"), {"options": "{}"}),
        ["prune", "--keep", "0.5", "--run", R, "--resume", *QUICK_PRUNE], ["lacks records", "without --resume"]),
    "prune-untrained-run": (own_run_of("conv_only.py", GOOD_NET.format(out="self.a(x)")),
                            ["prune", "--keep", "0.5", "--run", "{w}/own", *QUICK_PRUNE], ["data"]),
    # -------------------------------------------------------------- export
    "export-no-run": (nothing, ["export", "--run", "{w}/none"], ["no bnnslim run"]),
    "export-pruned-from-another-run": (swap_pruned_with_another_run, ["export", "--run", R, "--no-evaluate"],
                                       ["does not belong to run"]),
    "export-pruned-truncated": (truncate("run/pruned.safetensors", 100), ["export", "--run", R, "--no-evaluate"],
                                ["does not belong to run"]),
    "export-output-is-directory": (nothing, ["export", "--run", R, "-f", "plain", "-o", "{w}", "--no-evaluate"],
                                   ["is a directory"]),
    "export-output-two-formats": (nothing, ["export", "--run", R, "-o", "{w}/m.safetensors", "--no-evaluate"],
                                  ["names one file"]),
    "export-unknown-format": (nothing, ["export", "--run", R, "-f", "tflite", "--no-evaluate"], ["unknown format"]),
    "export-output-under-a-file": (write("blocker", "x"), ["export", "--run", R, "-f", "plain", "-o",
                                                           "{w}/blocker/m.safetensors", "--no-evaluate"],
                                   ["cannot write"]),
    "export-manifest-shape-huge": (edit_manifest(setitem("input_shape", [1, 100000, 100000])),
                                   ["export", "--run", R, "--no-evaluate"], ["input shape"]),
    "export-manifest-foreign-source": (lambda w: edit_manifest(setitem("model.source", str(w / "net.py")))(w),
                                       ["export", "--run", R, "--no-evaluate"], ["no valid signature"]),
    "export-model-flag-missing-file": (nothing, ["export", "--run", R, "--model", "{w}/nope.py", "--no-evaluate"],
                                       ["not found"]),
    # -------------------------------------------------------------- info on model files
    "info-file-truncated": (truncate("run/model.safetensors", 50), ["info", "{w}/run/model.safetensors"],
                            ["truncated or corrupted"]),
    "info-file-garbage": (write("g.safetensors", b"\xff" * 64), ["info", "{w}/g.safetensors"],
                          ["truncated or corrupted"]),
    "info-file-foreign-safetensors": (lambda w: save_file({"w": torch.zeros(1)}, str(w / "f.safetensors")),
                                      ["info", "{w}/f.safetensors"], ["not a bnnslim model"]),
    "info-file-newer-format": (edit_header("run/model.safetensors", "format_version", "99"),
                               ["info", "{w}/run/model.safetensors"], ["file format 99"]),
    "info-file-model-not-json": (edit_header("run/model.safetensors", "model", "{oops"),
                                 ["info", "{w}/run/model.safetensors"], ["'model' is damaged"]),
    "info-file-model-missing": (edit_header("run/model.safetensors", "model", None),
                                ["info", "{w}/run/model.safetensors"], ["'model' is missing"]),
    "info-file-layers-not-json": (edit_header("run/model.safetensors", "layers", "[1,"),
                                  ["info", "{w}/run/model.safetensors"], ["'layers' is damaged"]),
    "info-file-layers-bad-shape": (edit_header("run/model.safetensors", "layers", '{"0.0": {"in": 0}}'),
                                   ["info", "{w}/run/model.safetensors"], ["shape of layer '0.0'"]),
    "info-file-metrics-not-json": (edit_header("run/model.bnn.safetensors", "metrics", "nan{"),
                                   ["info", "{w}/run/model.bnn.safetensors"], ["'metrics' is damaged"]),
    "info-file-input-shape-missing": (edit_header("run/model.safetensors", "input_shape", None),
                                      ["info", "{w}/run/model.safetensors"], ["'input_shape' is missing"]),
    "info-file-sha-null": (edit_header("run/model.safetensors", "model", json.dumps(
        {"source": "/x/net.py", "name": "tiny", "sha256": None})), ["info", "{w}/run/model.safetensors"],
        ["no valid sha256"]),
    "info-file-binary-layers-not-list": (edit_header("run/model.safetensors", "binary_layers", '"3"'),
                                         ["info", "{w}/run/model.safetensors"], ["'binary_layers' is damaged"]),
    "info-file-no-scheme": (edit_header("run/model.safetensors", "scheme", None),
                            ["info", "{w}/run/model.safetensors"], ["scheme"]),
    # -------------------------------------------------------------- bench
    "bench-missing-file": (nothing, ["bench", "{w}/nope.safetensors"], ["not found"]),
    "bench-directory-not-a-run": (write("plain/x", "x"), ["bench", "{w}/plain"], ["not a bnnslim run"]),
    "bench-run-without-export": (lambda w: [(w / "run" / n).unlink() for n in ("model.safetensors",
                                                                               "model.bnn.safetensors")],
                                 ["bench", R], ["no exported model"]),
    "bench-batch-zero": (nothing, ["bench", "{w}/run/model.bnn.safetensors", "-b", "0"], ["--batch 0"]),
    "bench-threads-zero": (nothing, ["bench", "{w}/run/model.bnn.safetensors", "-t", "0"], ["--threads 0"]),
    "bench-repeats-zero": (nothing, ["bench", "{w}/run/model.bnn.safetensors", "--repeats", "0"], ["--repeats"]),
    "bench-warmup-negative": (nothing, ["bench", "{w}/run/model.bnn.safetensors", "--warmup", "-1"], ["--warmup"]),
    "bench-batch-huge": (nothing, ["bench", "{w}/run/model.bnn.safetensors", "-b", "4000000000", "--repeats", "1",
                                   "--warmup", "0", "--no-layers"], ["out of memory"]),
    "bench-foreign-header-source": (edit_header("run/model.bnn.safetensors", "model_signature", "0" * 64),
                                    ["bench", "{w}/run/model.bnn.safetensors", "--repeats", "1"],
                                    ["no valid signature"]),
    "bench-damaged-header": (edit_header("run/model.bnn.safetensors", "layers", "{"),
                             ["bench", "{w}/run/model.bnn.safetensors"], ["'layers' is damaged"]),
    "bench-manifest-damaged": (write("run/manifest.json", "{"), ["bench", R], ["not valid JSON"]),
    "bench-model-flag-other-file": (model_file("def build_model(): return nn.Linear(2, 2)\n"),
                                    ["bench", "{w}/run/model.bnn.safetensors", "--model", "{w}/bad.py"],
                                    ["changed since"]),
    "bench-trust-source-pyc": (lambda w: chain(write("m.pyc", b"\x00"), edit_header(
                               "run/model.bnn.safetensors", "model",
                               json.dumps({"source": str(w / "m.pyc"), "name": "tiny", "sha256": "0" * 64})))(w),
                               ["bench", "{w}/run/model.bnn.safetensors", "--trust-source"],
                               ["not a Python source file"]),
    # -------------------------------------------------------------- trust
    "trust-no-run": (nothing, ["trust", "--run", "{w}/none"], ["no bnnslim run"]),
    "trust-changed-model-file": (chain(own_run_of("mine.py", GOOD_NET.format(out="self.a(x)")),
                                       write("mine.py", "# changed\n")), ["trust", "--run", "{w}/own"],
                                 ["changed since"]),
    "trust-relative-source": (edit_manifest(setitem("model.source", "net.py")), ["trust", "--run", R],
                              ["not an absolute .py path"]),
    "trust-missing-model-file": (edit_manifest(setitem("model.source", "/nonexistent/net.py")),
                                 ["trust", "--run", R], ["no longer exists"]),
    # -------------------------------------------------------------- plugins, environment
    "plugins-broken-entry-point": (nothing, ["plugins", "--json"], ["failed to import"]),
}


@pytest.fixture
def work(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    w = tmp_path / "w"
    shutil.copytree(base, w, symlinks=True)
    manifest = json.loads((w / "run" / "manifest.json").read_text())
    assert manifest["model"]["source"] == str(base / "net.py")  # the copy still uses the base's (unchanged) file
    monkeypatch.chdir(w)
    return w


def _broken_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from bnnslim import plugins

    ep = importlib.metadata.EntryPoint(name="gone", value="no_such_module_zz", group="bnnslim")
    monkeypatch.delenv(plugins.DISABLE_EXTERNAL_ENV)
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda group=None: [ep])
    plugins.reset_plugin_manager()


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_bad_input_on_the_command_line(case: str, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make, args, words = CLI_CASES[case]
    make(work)
    if case == "plugins-broken-entry-point":
        _broken_entry_point(monkeypatch)
    argv = [a.replace("{w}", str(work)) for a in args]
    before = snapshot(work)
    try:
        result = CliRunner().invoke(app, argv)
    finally:
        if case == "plugins-broken-entry-point":
            from bnnslim import plugins

            plugins.reset_plugin_manager()
    output = result.output
    assert result.exit_code == 1, f"{case}: exit {result.exit_code}\n{output}\n{result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert "Traceback" not in output
    for word in words:
        assert word in output, f"{case}: {word!r} not in {output!r}"
    after = snapshot(work)
    changed = [k for k in before if after.get(k) != before[k]]
    added = [k for k in after if k not in before and not k.rsplit("/", 1)[-1].endswith(".lock")]
    assert not changed and not added, f"{case}: changed {changed}, added {added}"


# ------------------------------------------------------------------ the Python API: bnnslim.load


def header_case(key: str, value: str | None) -> Callable[[Path], Path]:
    def make(w: Path) -> Path:
        edit_header("run/model.safetensors", key, value)(w)
        return w / "run" / "model.safetensors"
    return make


LOAD_CASES: dict[str, Callable[[Path], Path]] = {
    "missing": lambda w: w / "nope.safetensors",
    "directory": lambda w: w / "run",
    "empty-file": lambda w: (write("e.safetensors", b"")(w), w / "e.safetensors")[1],
    "header-length-too-big": lambda w: (write("h.safetensors", b"\xff" * 8 + b"{}")(w), w / "h.safetensors")[1],
    "header-not-json": lambda w: (write("j.safetensors", b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{")(w),
                                  w / "j.safetensors")[1],
    "truncated-tensors": lambda w: (truncate("run/model.safetensors", 2000)(w), w / "run" / "model.safetensors")[1],
    "model-list": header_case("model", "[]"),
    "model-name-dotted": header_case("model", json.dumps({"source": "torchvision", "name": "os.system",
                                                          "sha256": "0" * 64})),
    "model-unknown-plugin": header_case("model", json.dumps({"source": "nosuchzoo", "name": "net",
                                                             "sha256": "0" * 64})),
    "model-relative-file": header_case("model", json.dumps({"source": "net.py", "name": "tiny", "sha256": "0" * 64})),
    "layers-huge": header_case("layers", json.dumps({"0.0": {"in": 1, "out": 1 << 30, "groups": 1}})),
    "layers-groups-mismatch": header_case("layers", json.dumps({"0.0": {"in": 3, "out": 4, "groups": 2}})),
    "input-shape-empty": header_case("input_shape", "[]"),
    "binary-layers-unknown": header_case("binary_layers", '["nosuch"]'),
    "scheme-unknown": header_case("scheme", "nosuch"),
    "form-unknown": header_case("form", "zipped"),
    "tensor-missing": lambda w: (edit_tensors("run/model.safetensors", lambda t: t.pop(sorted(t)[0]))(w),
                                 w / "run" / "model.safetensors")[1],
    "tensor-reshaped": lambda w: (edit_tensors("run/model.safetensors",
                                               lambda t: t.update({sorted(t)[1]: torch.zeros(7, 7)}))(w),
                                  w / "run" / "model.safetensors")[1],
    "packed-alpha-missing": lambda w: (edit_tensors("run/model.bnn.safetensors", lambda t: [
        t.pop(k) for k in [k for k in t if k.endswith(".alpha")][:1]])(w), w / "run" / "model.bnn.safetensors")[1],
    "packed-bits-wrong-dtype": lambda w: (edit_tensors("run/model.bnn.safetensors", lambda t: t.update(
        {k: v.float() for k, v in t.items() if k.endswith("weight_bits")}))(w), w / "run" / "model.bnn.safetensors")[1],
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_bad_file_for_the_python_api(case: str, work: Path, base: Path) -> None:
    path = LOAD_CASES[case](work)
    before = snapshot(work)
    for kwargs in ({}, {"model": f"{base / 'net.py'}:tiny"}, {"runtime": "packed"}, {"trust_source": True}):
        with pytest.raises(BnnslimError):
            bnnslim.load(path, **kwargs)
    assert snapshot(work) == before


def test_the_catalogue_holds_at_least_100_distinct_inputs() -> None:
    assert len(CLI_CASES) + len(LOAD_CASES) >= 100


def test_damaged_training_records_show_as_unknown_in_info(work: Path) -> None:
    """`bnnslim info` shows what it can of a run whose training records are damaged: '?' and no traceback."""
    edit_manifest(lambda m: (setitem("prune.accuracy_before", "x")(m), setitem("prune.teacher", 5)(m),
                             setitem("teacher", [1])(m)))(work)
    result = CliRunner().invoke(app, ["info", "--run", str(work / "run")])
    assert result.exit_code == 0 and result.exception is None, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "test accuracy ? before" in text and "teacher: none" in text
