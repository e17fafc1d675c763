"""bnnslim's model files: slim weights in safetensors, reloaded without pickle.

Two forms, both one safetensors file whose header metadata (JSON strings) says
how to rebuild the model:

* **plain** (``model.safetensors``): every tensor of the slim model's state dict,
  binary convs as latent real weights;
* **packed** (``*.bnn.safetensors``): binary convs as 1-bit signs plus ``alpha``
  (see :mod:`bnnslim.packing`), every other tensor as it is.

Metadata keys: ``format`` ("bnnslim-model"), ``format_version``, ``form`` ("plain" | "packed"),
``bnnslim_version``, ``model`` (source file, name, sha256, num_classes,
in_channels), ``scheme``, ``binary_layers``, ``layers`` (the slim shape of every
conv, linear and batch norm: enough to rebuild the slim architecture from the
unpruned model file), ``input_shape``, ``metrics``.

Reloading builds the model from code the user trusts (:mod:`bnnslim.trust`:
never code a file merely names), binarizes the same layers, resizes every
layer to its stored shape and loads the tensors strictly. A model file whose
content changed since export is refused; so is any damaged header field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnnslim._atomic import save_tensors
from bnnslim._version import __version__
from bnnslim.binary.convert import apply_binarization
from bnnslim.binary.layers import BinaryConv2d
from bnnslim.errors import BnnslimError
from bnnslim.model_source import ModelSource
from bnnslim.packing import pack_signs, unpack_signs
from bnnslim.plugins import get_scheme, provenance, recorded_plugin
from bnnslim.rundir import load_with_metadata
from bnnslim.trust import ModelArg, RecordedModel, model_source_for, recorded_model

FORMAT = "bnnslim-model"
#: Bumped when the file layout changes; a reader refuses versions it does not know.
FORMAT_VERSION = "1"
#: what ``load(..., runtime=)`` accepts: torch's emulation (BinaryConv2d) or the packed runtime
RUNTIMES = ("torch", "packed")
#: the largest channel count or input size a header may record (a damaged header must not allocate terabytes)
MAX_COUNT = 1 << 20
#: the most values one input of the recorded shape may hold (load runs the model once on such an input)
MAX_INPUT_VALUES = 1 << 26


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """The channel sizes of every conv, linear and batch norm (what slimming changes)."""
    shapes: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            shapes[name] = {"in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            shapes[name] = {"features": m.num_features}
    return shapes


def resize_layers(model: nn.Module, shapes: dict[str, dict[str, int]]) -> None:
    """Give each layer of a freshly built model the stored slim sizes (uninitialised tensors)."""
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        m = modules.get(name)
        if m is None:
            raise BnnslimError(f"the model file has no layer '{name}' that the weights file needs",
                               "load with the model file the weights were exported from")
        if isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = shape["in"], shape["out"], shape["groups"]
            m.weight = nn.Parameter(torch.empty(shape["out"], shape["in"] // shape["groups"], *m.kernel_size))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(shape["out"]))
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = shape["in"], shape["out"]
            m.weight = nn.Parameter(torch.empty(shape["out"], shape["in"]))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(shape["out"]))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = shape["features"]
            m.num_features = n
            if m.affine:
                m.weight = nn.Parameter(torch.empty(n))
                m.bias = nn.Parameter(torch.empty(n))
            if m.track_running_stats:
                m.running_mean = torch.zeros(n)
                m.running_var = torch.ones(n)


def resize_others(model: nn.Module, tensors: dict[str, torch.Tensor], sized: Iterable[str] = ()) -> None:
    """Give any other parameter or buffer its stored shape (a custom layer that a plugin's pruner sliced).

    Layers in ``sized`` (those the header gives shapes for) are left as they are.
    """
    sized = set(sized)
    for key, value in model.state_dict().items():
        stored = tensors.get(key)
        if stored is None or tuple(stored.shape) == tuple(value.shape):
            continue
        module_name, _, attr = key.rpartition(".")
        if module_name in sized:
            continue
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            setattr(module, attr, nn.Parameter(torch.empty(stored.shape, dtype=value.dtype)))
        elif attr in module._buffers:
            module._buffers[attr] = torch.empty(stored.shape, dtype=value.dtype)


def header(manifest: dict[str, Any], model: nn.Module, form: str, metrics: dict[str, Any]) -> dict[str, str]:
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "form": form, "bnnslim_version": __version__,
        "model": json.dumps(manifest["model"]), "scheme": manifest["scheme"],
        "binary_layers": json.dumps(manifest["layers"]["binary"]),
        "layers": json.dumps(layer_shapes(model)), "input_shape": json.dumps(manifest["input_shape"]),
        "metrics": json.dumps(metrics),
        # what to install to load it: the run's record, or (bnnslim.save of an in-memory model) who provides it now
        "plugins": json.dumps({"scheme": recorded_plugin(manifest, "scheme")
                               or provenance("scheme", manifest["scheme"])}),
    }
    if manifest.get("model_signature"):
        meta["model_signature"] = str(manifest["model_signature"])  # this account's, see bnnslim.trust
    return meta


def packed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every binary conv as sign bits + alpha (+ bias)."""
    tensors = dict(model.state_dict())
    for name, m in model.named_modules():
        if not isinstance(m, BinaryConv2d):
            continue
        del tensors[f"{name}.weight"]
        with torch.no_grad():
            signs = m.scheme.binarize_weight(m.weight)
            alpha = m.scheme.scale(m.weight, None)
        tensors[f"{name}.weight_bits"] = pack_signs(signs)
        if alpha is not None:
            tensors[f"{name}.alpha"] = alpha.flatten().to(torch.float32)
    return tensors


def write_model_file(path: Path, model: nn.Module, manifest: dict[str, Any], form: str,
                     metrics: dict[str, Any] | None = None) -> None:
    """Write ``model`` (slim, binarized) as a plain or packed bnnslim model file, atomically."""
    tensors = packed_tensors(model) if form == "packed" else dict(model.state_dict())
    save_tensors(path, tensors, header(manifest, model, form, metrics or {}))


def read_header(path: Path) -> dict[str, str]:
    """The metadata of a bnnslim model file, checked field by field (clear errors for other or damaged files)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        raise BnnslimError(f"'{path}' is a directory, not a model file",
                           "give the path of a file written by `bnnslim export`")
    if not path.is_file():
        raise BnnslimError(f"'{path}' not found", "give the path of a file written by `bnnslim export`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BnnslimError(f"'{path}' is not a readable safetensors file ({exc})",
                           "it is truncated or corrupted: export it again") from exc
    if meta.get("format") != FORMAT:
        raise BnnslimError(f"'{path}' is a safetensors file but not a bnnslim model",
                           "give a file written by `bnnslim export`")
    if meta.get("format_version") != FORMAT_VERSION or meta.get("form") not in ("plain", "packed"):
        raise BnnslimError(
            f"'{path}' was written by bnnslim {meta.get('bnnslim_version', '?')} in file format "
            f"{meta.get('format_version', '?')} ({meta.get('form', '?')}); this bnnslim {__version__} reads format "
            f"{FORMAT_VERSION} (plain or packed)",
            "export it again with this version, or load it with the bnnslim that wrote it")
    parse_header(meta, path)
    return meta


@dataclass(frozen=True)
class Header:
    """The parsed, validated metadata of a model file."""

    model: RecordedModel
    scheme: str
    binary_layers: list[str]
    layers: dict[str, dict[str, int]]
    input_shape: tuple[int, ...]
    metrics: dict[str, Any]
    signature: str | None
    plugins: dict[str, Any] = field(default_factory=dict)  # kind -> plugins.provenance record


def _field(meta: dict[str, str], key: str, path: Path, kind: type, required: bool = True) -> Any:
    raw = meta.get(key)
    if raw is None and not required:
        return kind()
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, kind):
        state = "missing" if raw is None else "damaged"
        raise BnnslimError(f"'{path}': the header field '{key}' is {state} (not a JSON {kind.__name__})",
                           "the file is damaged: export it again")
    return value


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_COUNT


def parse_header(meta: dict[str, str], path: Path) -> Header:
    """Parse and check every header field that rebuilding the model reads."""
    damaged = "the file is damaged: export it again"
    model = recorded_model(_field(meta, "model", path, dict), f"'{path}'")
    scheme = meta.get("scheme")
    if not isinstance(scheme, str) or not scheme:
        raise BnnslimError(f"'{path}': the header names no binarization scheme", damaged)
    binary = _field(meta, "binary_layers", path, list)
    if not all(isinstance(n, str) for n in binary):
        raise BnnslimError(f"'{path}': the header field 'binary_layers' is not a list of layer names", damaged)
    layers = _field(meta, "layers", path, dict)
    for name, shape in layers.items():
        keys = ({"in", "out", "groups"}, {"in", "out"}, {"features"})
        if not isinstance(shape, dict) or set(shape) not in keys or not all(_count(v) for v in shape.values()) \
                or shape.get("in", 1) % shape.get("groups", 1):
            raise BnnslimError(f"'{path}': the header's shape of layer '{name}' is damaged ({shape!r})", damaged)
    shape = _field(meta, "input_shape", path, list)
    if not shape or len(shape) > 4 or not all(_count(d) for d in shape):
        raise BnnslimError(f"'{path}': the header's input shape {shape!r} is not a list of positive sizes", damaged)
    if math.prod(shape) > MAX_INPUT_VALUES:
        raise BnnslimError(f"'{path}': the header's input shape {shape!r} holds more than {MAX_INPUT_VALUES} values",
                           damaged)
    metrics = _field(meta, "metrics", path, dict, required=False)
    plugins = _field(meta, "plugins", path, dict, required=False)  # files before 0.x lack it
    return Header(model=model, scheme=scheme, binary_layers=binary, layers=layers, input_shape=tuple(shape),
                  metrics=metrics, signature=meta.get("model_signature"), plugins=plugins)


def load(path: str | Path, model: ModelArg = None, *, runtime: str = "torch", trust_source: bool = False) -> nn.Module:
    """Rebuild the slim model stored in ``path`` (plain or packed), in eval mode, without pickle.

    The model's code is what ``model`` names (``FILE[:NAME]``, ``PREFIX:NAME``, an
    ``nn.Module`` or a factory), else what the file records when that is a plugin
    source or a source signed by this account; ``trust_source=True`` uses a
    recorded model file otherwise (see :mod:`bnnslim.trust`). A ``.py`` file must
    have the sha256 recorded at export.

    ``runtime="torch"`` (the default) gives binary convs as ``BinaryConv2d`` (torch's
    float emulation); ``runtime="packed"`` gives them as
    :class:`bnnslim.runtime.PackedBinaryConv2d` on the XNOR-popcount kernels: from a
    packed file with its stored bits and alpha as they are, from a plain file packed
    on load (see :func:`bnnslim.runtime.to_runtime`).

    Raises only :class:`BnnslimError` for a bad file.
    """
    if runtime not in RUNTIMES:
        raise BnnslimError(f"unknown runtime '{runtime}'", f"choose from {', '.join(RUNTIMES)}")
    path = Path(path)
    meta = read_header(path)
    head = parse_header(meta, path)
    source = model_source_for(head.model, f"'{path}'", model=model, trust_source=trust_source,
                              signature=head.signature)
    return rebuild(path, meta, head, source, runtime)


def model_source_of(path: str | Path, model: ModelArg = None, *, trust_source: bool = False) -> ModelSource:
    """The model code that :func:`load` would use for ``path`` (same rules)."""
    path = Path(path)
    head = parse_header(read_header(path), path)
    return model_source_for(head.model, f"'{path}'", model=model, trust_source=trust_source,
                            signature=head.signature)


def rebuild(path: Path, meta: dict[str, str], head: Header, source: ModelSource, runtime: str) -> nn.Module:
    """Build ``source``'s model, binarize and resize it as ``head`` says, and load ``path``'s tensors into it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = source.build(num_classes=head.model.num_classes, in_channels=head.model.in_channels)
    modules = dict(model.named_modules())
    for name in head.binary_layers:
        if not isinstance(modules.get(name), nn.Conv2d):
            raise BnnslimError(f"'{path}' binarizes layer '{name}', which {source.where} has no Conv2d for",
                               "load with the model code the file was exported from")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BnnslimError(f"'{path}' is damaged ({exc})", "export it again") from exc
    _check_layer_tensors(path, head.layers, tensors, meta.get("form") == "packed")
    apply_binarization(model, head.binary_layers, get_scheme(head.scheme, head.plugins.get("scheme")))
    resize_layers(model, head.layers)
    stored = tensors
    if meta.get("form") == "packed":
        tensors = _unpack(model, tensors)
    resize_others(model, tensors, head.layers)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise BnnslimError(f"'{path}' lacks tensors the model needs: {missing[:3]}", "export it again")
    bad = [k for k in own if tuple(own[k].shape) != tuple(tensors[k].shape)]
    if bad:
        raise BnnslimError(f"'{path}': tensor {bad[0]} has shape {tuple(tensors[bad[0]].shape)}, "
                           f"the rebuilt model expects {tuple(own[bad[0]].shape)}", "export it again")
    load_with_metadata(model, {k: tensors[k] for k in own})
    model.eval()
    _check_runs(path, model, head.input_shape)
    if runtime == "packed":
        from bnnslim.runtime import to_runtime

        model = to_runtime(model, inplace=True, packed=stored if meta.get("form") == "packed" else None)
    return model.eval()


def _check_layer_tensors(path: Path, layers: dict[str, dict[str, int]], tensors: dict[str, torch.Tensor],
                         packed: bool) -> None:
    """The header's layer shapes agree with the stored tensors (so nothing larger than the file is allocated)."""
    for name, shape in layers.items():
        if "features" in shape:
            got = next((tensors[f"{name}.{k}"] for k in ("weight", "running_mean") if f"{name}.{k}" in tensors), None)
            ok = got is None or tuple(got.shape) == (shape["features"],)
        elif "groups" in shape:
            per_group = shape["in"] // shape["groups"]
            got = tensors.get(f"{name}.weight")
            bits = tensors.get(f"{name}.weight_bits") if packed else None
            if got is None and bits is None:
                ok = False
            elif got is not None:
                ok = got.dim() == 4 and tuple(got.shape[:2]) == (shape["out"], per_group)
            else:
                assert bits is not None
                ok = (bits.dim() == 4 and bits.dtype == torch.uint8
                      and (bits.shape[0], bits.shape[3]) == (shape["out"], (per_group + 7) // 8))
        else:
            got = tensors.get(f"{name}.weight")
            ok = got is not None and tuple(got.shape) == (shape["out"], shape["in"])
        if not ok:
            raise BnnslimError(f"'{path}': the header's shape of layer '{name}' ({shape}) does not match its "
                               "stored tensors", "the file is damaged: export it again")


def _check_runs(path: Path, model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """One forward pass on zeros of the recorded input shape: the layer sizes fit together.

    The header's sizes each agree with their own tensors (:func:`_check_layer_tensors`), but only running
    the model shows that one layer's outputs match the next one's inputs: a packed conv stores its inputs
    rounded up to whole bytes, so a damaged ``in`` of 12 for 10 passes every per-layer check.
    """
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except (RuntimeError, ValueError, IndexError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BnnslimError(f"'{path}': the model rebuilt from its header does not run on its recorded input shape "
                           f"{list(input_shape)} ({first_line})", "the file is damaged: export it again") from exc


def _unpack(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Latent weights ``alpha * sign`` for every binary conv: the same sign and the same alpha."""
    out = dict(tensors)
    for name, m in model.named_modules():
        if not isinstance(m, BinaryConv2d):
            continue
        bits = out.pop(f"{name}.weight_bits", None)
        if bits is None:
            raise BnnslimError(f"packed file lacks the bits of {name}", "export it again")
        signs = unpack_signs(bits, m.in_channels // m.groups)
        alpha = out.pop(f"{name}.alpha", None)
        with torch.no_grad():
            scaled = m.scheme.scale(m.weight, None) is not None
        if alpha is None and scaled:
            raise BnnslimError(f"packed file lacks the alpha of {name} (scheme {m.scheme.name} scales its filters)",
                               "the file is damaged: export it again")
        if alpha is not None and alpha.numel() != m.out_channels:
            raise BnnslimError(f"packed file: alpha of {name} has {alpha.numel()} values for {m.out_channels} filters",
                               "the file is damaged: export it again")
        out[f"{name}.weight"] = signs if alpha is None else signs * alpha.view(-1, 1, 1, 1)
    return out
