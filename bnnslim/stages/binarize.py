"""``bnnslim binarize``: turn the user's model into a (trained) binary main network.

1. import the model file and build the model (``bnnslim.model_source``);
2. optionally load starting weights (safetensors; a PyTorch checkpoint only when
   the user names one, read with ``weights_only=True``);
3. choose the binary convs (first and last layers stay real by default) and swap
   them for ``BinaryConv2d`` under the chosen scheme;
4. check that torch-pruning still traces the binary model;
5. with a dataset, train it (``bnnslim.train``), checkpointing every epoch;
   with a float teacher (``--teacher FILE``, or ``--teacher-epochs N``: the float
   model trained first, saved as ``teacher.safetensors``, and the binary network
   started from its weights) the loss adds distillation from the teacher's
   outputs (Real-to-Binary, Martinez et al. 2020; ReActNet, Liu et al. 2020);
   with ``--real-weight-epochs N`` training takes two steps: N epochs with binary
   activations and real weights, then ``--epochs`` with both binary
   (``bnnslim.binary.two_step``);
6. write the run directory (manifest + ``binary.safetensors``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnnslim import distributed as D
from bnnslim.binary.convert import BinarizePlan, apply_binarization, clip_latent_weights, plan_binarization
from bnnslim.binary.two_step import real_weights
from bnnslim.checks import check_dataset_sample, check_model_output, warn_about_binarization
from bnnslim.errors import BnnslimError
from bnnslim.graph import build_graph
from bnnslim.model_source import ModelSource, load_model_source
from bnnslim.modes import eval_outputs
from bnnslim.plugin_types import DatasetSpec, DatasetSplits
from bnnslim.plugins import get_dataset, get_scheme, provenance
from bnnslim.rundir import RunDir, load_state, load_tensors, save_weights
from bnnslim.train import Checkpoint, EpochRecord, StepEvent, TrainConfig, evaluate, train_epochs

DEFAULT_SCHEME = "xnor"


@dataclass
class BinarizeOptions:
    model: str  # FILE[:NAME]
    run: Path = Path("bnnslim-run")
    data: str | None = None
    data_root: Path | None = None
    scheme: str = DEFAULT_SCHEME
    real: Sequence[str] = ()
    binary: Sequence[str] = ()
    keep_first_last_real: bool = True
    input_shape: tuple[int, ...] | None = None
    weights: Path | None = None
    train: TrainConfig | None = None  # None: convert only
    resume: bool = False
    overwrite: bool = False
    device: str = "cpu"
    sync_bn: bool = False
    teacher: Path | None = None  # float weights of the same model: distil from it
    teacher_epochs: int = 0  # or train the float model this long first, then distil from it
    real_weight_epochs: int = 0  # two-step training: this many epochs with real weights before --epochs


@dataclass
class BinarizeResult:
    run: RunDir
    plan: BinarizePlan
    model: nn.Module
    history: list[EpochRecord] = field(default_factory=list)
    test_accuracy: float | None = None
    seconds: float = 0.0


def wrap_for_training(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """The model as training sees it: DistributedDataParallel under torchrun (SyncBatchNorm if asked)."""
    if not D.is_distributed():
        return model
    if sync_bn:
        if device.type != "cuda":
            raise BnnslimError("--sync-bn needs GPUs (SyncBatchNorm has no CPU implementation)",
                               "drop --sync-bn on CPUs: each process then keeps its own batch statistics, "
                               "averaged at every forward from rank 0")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap_sync_bn(model: nn.Module) -> nn.Module:
    """Back to plain BatchNorm2d after SyncBatchNorm training (same state dict)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            bn.load_state_dict(m.state_dict())
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, bn)
    return model


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` or ``"3x32x32"`` -> (3, 32, 32)."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        shape = ()
    if len(shape) < 1 or any(d <= 0 for d in shape):
        raise BnnslimError(f"bad input shape '{text}'", "give it without the batch size, e.g. 3,32,32")
    return shape


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BnnslimError(f"device '{name}' requested but no CUDA GPU is available", "use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise BnnslimError(f"unknown device '{name}'", "use cpu, cuda, cuda:N or auto") from exc


def load_weights_into(model: nn.Module, path: Path) -> None:
    """Starting weights: safetensors, or a PyTorch checkpoint (weights only) the user named."""
    if not path.is_file():
        raise BnnslimError(f"weights file '{path}' not found", "check the --weights path")
    if path.suffix == ".safetensors":
        load_state(model, load_tensors(path), path)
        return
    if path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise BnnslimError(f"unknown weights format '{path.suffix}'", "give a .safetensors, .pt or .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BnnslimError(f"'{path}' could not be read as a weights-only PyTorch checkpoint ({_load_failure(exc)})",
                           "save a state_dict (torch.save(model.state_dict(), ...)) or use safetensors") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BnnslimError(f"'{path}' holds no state_dict", "save a state_dict")
    load_state(model, state, path)


def _load_failure(exc: Exception) -> str:
    """The one line of torch.load's (many-line) error that says why, e.g. the pickled class it refused."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:  # the lines before it are torch's general advice, among it to load unsafely
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(" was not an allowed global")[0] if lines else type(exc).__name__


def _check_forward(model: nn.Module, shape: tuple[int, ...], source: ModelSource) -> torch.Tensor:
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    try:
        output = eval_outputs(model, example)
    except Exception as exc:
        raise BnnslimError(
            f"the model rejects inputs of shape {tuple(shape)}: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            "give the right shape with --input-shape C,H,W (or INPUT_SHAPE in the model file), or another --data",
        ) from exc
    check_model_output(output, tuple(shape), source.where)
    return example


def _num_classes(spec: DatasetSpec, splits: DatasetSplits | None) -> int | None:
    if spec.num_classes:
        return spec.num_classes
    classes = getattr(splits.train, "classes", None) if splits is not None else None
    return len(classes) if classes else None


def _check_run_dir(run: RunDir, source: ModelSource, opts: BinarizeOptions) -> None:
    if not run.path.exists() or opts.overwrite:
        return
    if run.path.is_file():
        raise BnnslimError(f"run directory '{run.path}' is a file", "choose another --run DIR")
    if not run.exists():
        if any(run.path.iterdir()):
            raise BnnslimError(f"'{run.path}' exists and is not a bnnslim run directory",
                               "choose another --run DIR, or an empty one")
        return
    old = run.read_manifest()["model"]
    if old.get("sha256") != source.sha256 or Path(old.get("source", "")) != source.path:
        raise BnnslimError(
            f"run directory '{run.path}' belongs to another model ({old.get('source')})",
            "use --run DIR for a new run, or --overwrite to replace it",
        )


RESUME_MUST_MATCH = ("model", "input_shape", "scheme", "layers", "dataset", "teacher", "two_step")
TEACHER_WEIGHTS = "teacher.safetensors"
REAL_WEIGHT_CHECKPOINT = "real-weights.safetensors"  # step 1 of two-step training, under checkpoints/


def named_float_teacher(path: Path) -> dict[str, Any]:
    """What identifies float teacher weights the user named (``--teacher FILE`` of binarize and prune)."""
    from bnnslim.rundir import file_digest

    if not path.is_file():
        raise BnnslimError(f"teacher weights '{path}' not found", "check the --teacher path")
    return {"network": "the float model with the given weights", "weights": str(path), "sha256": file_digest(path)}


def _teacher_identity(opts: BinarizeOptions) -> dict[str, Any] | None:
    """What identifies the float teacher (recorded in the manifest; --resume must give the same)."""
    if opts.train is None or (opts.teacher is None and not opts.teacher_epochs):
        return None
    if opts.teacher is not None and opts.teacher_epochs:
        raise BnnslimError("--teacher and --teacher-epochs both given", "name a float teacher, or have one trained")
    loss = {"distill": opts.train.distill, "temperature": opts.train.temperature}
    if opts.teacher is not None:
        return {**named_float_teacher(Path(opts.teacher)), **loss}
    return {"network": f"the float model trained {opts.teacher_epochs} epochs first ({TEACHER_WEIGHTS}), "
                       "which also gives the binary network its starting weights",
            "epochs": opts.teacher_epochs, **loss}


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _two_step_identity(opts: BinarizeOptions) -> dict[str, Any] | None:
    """Two-step training as the manifest records it (``--resume`` must give the same)."""
    if opts.train is None or not opts.real_weight_epochs:
        return None
    return {"real_weight_epochs": opts.real_weight_epochs,
            "then": f"{opts.train.epochs} epochs with binary weights and activations"}


def _float_teacher(opts: BinarizeOptions, source: ModelSource, run: RunDir, splits: DatasetSplits,
                   num_classes: int | None, in_channels: int, device: torch.device,
                   on_phase: Callable[[str], None], on_step: Callable[[StepEvent], None] | None = None,
                   on_epoch: Callable[[EpochRecord], None] | None = None) -> tuple[nn.Module, float | None]:
    """The float twin of the model as teacher: loaded from --teacher, or trained for --teacher-epochs."""
    assert opts.train is not None
    torch.manual_seed(opts.train.seed)
    teacher = source.build(num_classes=num_classes, in_channels=in_channels)
    saved = run.path / TEACHER_WEIGHTS
    if opts.teacher is not None:
        load_weights_into(teacher, Path(opts.teacher))
        return teacher.to(device), None
    if opts.resume and saved.is_file():
        load_state(teacher, load_tensors(saved), saved)
        return teacher.to(device), None
    if opts.weights is not None:
        load_weights_into(teacher, opts.weights)
    teacher.to(device)
    cfg = replace(opts.train, epochs=opts.teacher_epochs)
    on_phase(f"float teacher: training the float model for {_epochs(opts.teacher_epochs)}")
    history = train_epochs(wrap_for_training(teacher, device, opts.sync_bn), splits.train, splits.test, cfg,
                           device, on_step=on_step, on_epoch=on_epoch).history
    teacher = unwrap_sync_bn(teacher)
    if D.is_main_process():
        save_weights(saved, teacher.to("cpu"), kind="float-teacher")
    D.barrier()
    return teacher.to(device), history[-1].test_accuracy if history else None


def _check_resume_matches(old: dict[str, Any], new: dict[str, Any]) -> None:
    """``--resume`` continues the run in the manifest: the model and binarization must be the same."""
    for key in RESUME_MUST_MATCH:
        now = json.loads(json.dumps(new[key]))  # as the manifest stores it (tuples become lists)
        if old.get(key) != now:
            was_text, now_text = (json.dumps(v)[:120] for v in (old.get(key), now))
            raise BnnslimError(
                f"--resume with different options than the interrupted run: {key} was {was_text}, now {now_text}",
                "use the same model, --data, --input-shape, --scheme and layer options as before, "
                "or start again without --resume",
            )


def binarize(opts: BinarizeOptions, on_step: Callable[[StepEvent], None] | None = None,
             on_epoch: Callable[[EpochRecord], None] | None = None,
             on_phase: Callable[[str], None] | None = None) -> BinarizeResult:
    """Run the binarize stage end to end (see the module docstring); ``on_phase`` hears each training phase begin."""
    started = time.perf_counter()
    run = RunDir(Path(opts.run))
    source = load_model_source(opts.model)
    scheme = get_scheme(opts.scheme)
    spec = get_dataset(opts.data) if opts.data else None
    _check_run_dir(run, source, opts)
    if opts.resume and not (run.exists() and any((run.checkpoints / name).is_file()
                                                 for name in ("train.safetensors", REAL_WEIGHT_CHECKPOINT))):
        raise BnnslimError(f"nothing to resume in '{run.path}'", "run the same command without --resume")
    if opts.resume and opts.train is None:
        raise BnnslimError("--resume needs --data: only training can be resumed", "add the --data of the first run")
    inputs = _model_inputs(opts, source, spec)
    torch.manual_seed(opts.train.seed if opts.train is not None else 0)  # the same command, the same initial weights
    model = source.build(num_classes=inputs.num_classes, in_channels=inputs.in_channels)
    if opts.weights is not None:
        load_weights_into(model, opts.weights)
    example = _check_forward(model, inputs.shape, source)
    plan = plan_binarization(model, example, opts.real, opts.binary, opts.keep_first_last_real)
    if not plan.binary:
        reasons = "; ".join(f"{n}: {r}" for n, r in plan.real.items()) or "it has no Conv2d layer"
        raise BnnslimError(f"nothing to binarize in {source.path.name} ({reasons})",
                           "binarize needs a conv between the first and last layers, or name layers with --binary")
    apply_binarization(model, plan.binary, scheme)
    warn_about_binarization(model, example)
    build_graph(model, example)

    manifest: dict[str, Any] = {
        "model": {"source": str(source.path), "name": source.name, "sha256": source.sha256,
                  "num_classes": inputs.num_classes, "in_channels": inputs.in_channels},
        "input_shape": list(inputs.shape),
        "scheme": scheme.name,
        "layers": {"binary": plan.binary, "real": plan.real},
        "dataset": {"name": spec.name, "root": str(opts.data_root) if opts.data_root else None} if spec else None,
        "binarize": {"trained": False},
        "teacher": _teacher_identity(opts),
        "two_step": _two_step_identity(opts),
        "plugins": {"scheme": provenance("scheme", scheme.name),
                    **({"dataset": provenance("dataset", spec.name)} if spec else {})},
    }
    result = BinarizeResult(run=run, plan=plan, model=model)
    if opts.train is not None and inputs.splits is not None:
        _train(opts, run, source, inputs, manifest, result, on_step, on_epoch, on_phase or (lambda text: None))
    result.seconds = time.perf_counter() - started
    manifest["binarize"]["seconds"] = round(result.seconds, 2)
    if D.is_main_process():
        run.path.mkdir(parents=True, exist_ok=True)
        save_weights(run.binary_weights, result.model, kind="binary-latent")
        run.write_manifest(manifest)
    D.barrier()
    return result


@dataclass
class ModelInputs:
    """What the model is built for and run on: input shape, classes, channels, and the data (when training)."""

    shape: tuple[int, ...]
    num_classes: int | None
    in_channels: int
    splits: DatasetSplits | None


def _model_inputs(opts: BinarizeOptions, source: ModelSource, spec: DatasetSpec | None) -> ModelInputs:
    """The input shape (--input-shape, the dataset's, or INPUT_SHAPE) and the data, checked against each other."""
    # a dataset that resizes (folder) follows the model's shape; any other gives the shape it has
    shape = opts.input_shape or (spec.shape_for(source.input_shape) if spec else None) or source.input_shape
    if shape is None:
        raise BnnslimError("the input shape is unknown",
                           "pass --input-shape C,H,W, a --data set, or set INPUT_SHAPE in the model file")
    splits = spec.splits_for(opts.data_root, shape) if (spec is not None and opts.train is not None) else None
    num_classes = _num_classes(spec, splits) if spec else None
    in_channels = spec.input_shape[0] if spec is not None and spec.build_at is None else shape[0]
    if splits is not None:
        check_dataset_sample(splits.train, tuple(shape), str(opts.data))
    return ModelInputs(tuple(shape), num_classes, in_channels, splits)


def _train(opts: BinarizeOptions, run: RunDir, source: ModelSource, inputs: ModelInputs, manifest: dict[str, Any],
           result: BinarizeResult, on_step: Callable[[StepEvent], None] | None,
           on_epoch: Callable[[EpochRecord], None] | None, on_phase: Callable[[str], None]) -> None:
    """Train ``result.model`` (checkpointed, resumable; a float teacher first when asked) and record it."""
    assert opts.train is not None and inputs.splits is not None
    splits, model = inputs.splits, result.model
    device = resolve_device(opts.device)
    model.to(device)
    checkpoint = Checkpoint(run.checkpoints / "train.safetensors", opts.train)
    step1 = Checkpoint(run.checkpoints / REAL_WEIGHT_CHECKPOINT, replace(opts.train, epochs=opts.real_weight_epochs))
    if opts.resume:
        _check_resume_matches(run.read_manifest(), manifest)
    elif D.is_main_process():
        # a fresh run replaces the old one: its checkpoint and weights must not pass for the new run's
        checkpoint.path.unlink(missing_ok=True)
        step1.path.unlink(missing_ok=True)
        run.binary_weights.unlink(missing_ok=True)
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_manifest(manifest)  # the run exists from the first epoch on, so it can be resumed
    D.barrier()
    teacher, teacher_accuracy = None, None
    if manifest["teacher"] is not None:
        teacher, teacher_accuracy = _float_teacher(opts, source, run, splits, inputs.num_classes, inputs.in_channels,
                                                   device, on_phase, on_step, on_epoch)
        if opts.teacher_epochs and opts.weights is None and not opts.resume:
            with torch.no_grad():  # start from the float weights (latent weights clipped to [-1, 1])
                model.load_state_dict(teacher.state_dict())
            clip_latent_weights(model, opts.train.clip or 1.0)
    resume_main = opts.resume and checkpoint.path.is_file()
    step1_history: list[EpochRecord] = []
    if opts.real_weight_epochs and not resume_main:
        on_phase(f"step 1 of 2: {_epochs(opts.real_weight_epochs)} with binary activations and real weights")
        with real_weights(model):
            step1_history = train_epochs(wrap_for_training(model, device, opts.sync_bn), splits.train, splits.test,
                                         step1.config, device, step1, opts.resume, on_step=on_step,
                                         on_epoch=on_epoch, teacher=teacher).history
        model = unwrap_sync_bn(model)
    elif opts.real_weight_epochs:
        step1_history = step1.history()
    if opts.real_weight_epochs:
        on_phase(f"step 2 of 2: {_epochs(opts.train.epochs)} with binary activations and weights")
    trained = train_epochs(wrap_for_training(model, device, opts.sync_bn), splits.train, splits.test, opts.train,
                           device, checkpoint, resume_main, on_step=on_step, on_epoch=on_epoch, teacher=teacher)
    model = unwrap_sync_bn(model).to("cpu")
    result.model = model
    D.check_same_on_all_ranks(model.state_dict(), "binary network weights")
    result.history = trained.history
    result.test_accuracy = trained.history[-1].test_accuracy if trained.history else (
        evaluate(model, splits.test, torch.device("cpu")).accuracy)
    manifest["binarize"] = {"trained": True, "train": asdict(opts.train),
                            "history": [asdict(h) for h in trained.history],
                            "test_accuracy": result.test_accuracy,
                            "processes": D.world_size()}
    if step1_history:
        manifest["binarize"]["real_weight_history"] = [asdict(h) for h in step1_history]
    if manifest["teacher"] is not None:
        manifest["binarize"]["loss"] = (f"cross-entropy + {opts.train.distill:g} * T^2 * KL(teacher || student) "
                                        f"at T = {opts.train.temperature:g}")
        if teacher_accuracy is not None:
            manifest["binarize"]["teacher_test_accuracy"] = teacher_accuracy
