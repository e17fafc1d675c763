"""Which convs become binary (first/last rule, name patterns), and tracing after binarization."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from _helpers import EXAMPLE_FILES, builtin_scheme
from torch import nn

from bnnslim.binary.convert import apply_binarization, binary_convs, clip_latent_weights, plan_binarization
from bnnslim.binary.layers import BinaryConv2d
from bnnslim.errors import BnnslimError
from bnnslim.graph import build_graph
from bnnslim.model_source import load_model_source
from bnnslim.stages.binarize import BinarizeOptions, binarize


class Net(nn.Module):
    """Modules declared in a different order than the forward pass runs them."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(8, 3, 1)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Hardtanh(), nn.Conv2d(8, 8, 3, padding=1))
        self.unused = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x))).mean((2, 3))


EXAMPLE = torch.randn(2, 1, 8, 8)


def test_first_and_last_in_forward_order_stay_real() -> None:
    plan = plan_binarization(Net(), EXAMPLE)
    assert plan.binary == ["body.0", "body.2"]
    assert plan.real == {"head": "last layer", "stem": "first layer", "unused": "not used in the forward pass"}


def test_last_layer_rule_applies_to_a_linear_classifier() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    plan = plan_binarization(model, EXAMPLE)
    assert plan.binary == ["1"]  # the last conv is binary: the linear is the last layer
    assert plan.real == {"0": "first layer"}


def test_binarize_first_last_too() -> None:
    plan = plan_binarization(Net(), EXAMPLE, keep_first_last_real=False)
    assert plan.binary == ["head", "stem", "body.0", "body.2"]


def test_real_pattern_keeps_matching_convs_real() -> None:
    plan = plan_binarization(Net(), EXAMPLE, real=["body.2"])
    assert plan.binary == ["body.0"]
    assert plan.real["body.2"] == "matches a --real pattern"


def test_binary_pattern_overrides_first_last_rule() -> None:
    plan = plan_binarization(Net(), EXAMPLE, binary=["st*"])
    assert plan.binary == ["stem", "body.0", "body.2"]
    assert plan.real["head"] == "last layer"


def test_glob_patterns_match_whole_names() -> None:
    plan = plan_binarization(Net(), EXAMPLE, real=["body.*"])
    assert plan.binary == []
    assert set(plan.real) == {"head", "stem", "body.0", "body.2", "unused"}


@pytest.mark.parametrize("option", ["real", "binary"])
def test_pattern_matching_nothing_is_an_error_listing_layer_names(option: str) -> None:
    with pytest.raises(BnnslimError, match="'layer9' matches no conv layer") as err:
        plan_binarization(Net(), EXAMPLE, **{option: ["layer9"]})
    assert "body.0" in str(err.value)  # the fix names the conv layers that exist


def test_planning_does_not_change_the_model_or_its_mode() -> None:
    model = Net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan_binarization(model, EXAMPLE)
    assert model.training
    assert not any(isinstance(m, BinaryConv2d) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_apply_binarization_swaps_only_planned_convs_and_keeps_weights() -> None:
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_binarization(model, ["body.0", "body.2"], builtin_scheme("xnor"))
    assert list(binary_convs(model)) == ["body.0", "body.2"]
    assert type(model.stem) is nn.Conv2d and type(model.head) is nn.Conv2d
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model(EXAMPLE).shape == (2, 3)


def test_apply_binarization_rejects_a_non_conv() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 2))
    with pytest.raises(BnnslimError, match="'2' is not a Conv2d"):
        apply_binarization(model, ["2"], builtin_scheme("xnor"))


def test_clip_latent_weights_clips_binary_convs_only() -> None:
    model = Net()
    apply_binarization(model, ["body.0"], builtin_scheme("xnor"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    clip_latent_weights(model)
    assert model.body[0].weight.abs().max() <= 1.0
    assert model.stem.weight.abs().max() > 1.0  # real layers are not clipped


def example_specs() -> list[str]:
    return [f"{f}:{name}" for f in EXAMPLE_FILES for name in ("build_model", "tiny")]


def test_there_are_example_models() -> None:
    assert {f.name for f in EXAMPLE_FILES} >= {"small_cnn.py", "nin.py", "vgg11.py", "resnet18.py"}


@pytest.mark.parametrize("spec", example_specs(), ids=lambda s: Path(s).name)
@pytest.mark.parametrize("scheme_name", ["xnor", "bireal"])
def test_every_example_binarizes_and_traces_with_torch_pruning(spec: str, scheme_name: str) -> None:
    source = load_model_source(spec)
    model = source.build()
    example = torch.randn(2, *source.input_shape)
    plan = plan_binarization(model, example)
    assert len(plan.binary) >= 3
    apply_binarization(model, plan.binary, builtin_scheme(scheme_name))
    assert list(binary_convs(model)) == plan.binary
    model.train()
    graph = build_graph(model, example)
    assert model.training  # tracing keeps the mode
    for name, conv in binary_convs(model).items():
        assert conv in graph.module2node, f"{name} is not in the dependency graph"
    # the graph couples a binary conv's filters with the layers that read them
    conv = next(iter(binary_convs(model).values()))
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
    assert len(group) >= 2
    assert graph.check_pruning_group(group)
    out = model(example)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_graph_rejects_parameters_torch_pruning_cannot_slice() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.gain = nn.Parameter(torch.ones(1, 4, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * self.gain

    with pytest.raises(BnnslimError, match="gain"):
        build_graph(Scaled(), EXAMPLE)


def test_model_with_nothing_to_binarize_is_an_error(write_model: Callable[..., Path], tmp_path: Path) -> None:
    path = write_model("""
        from torch import nn
        INPUT_SHAPE = (1, 8, 8)
        def build_model():
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    """)
    with pytest.raises(BnnslimError, match="nothing to binarize") as err:
        binarize(BinarizeOptions(model=str(path), run=tmp_path / "run"))
    assert "0: first layer" in str(err.value) and "--binary" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_model_without_conv_is_an_error(write_model: Callable[..., Path], tmp_path: Path) -> None:
    path = write_model("""
        from torch import nn
        INPUT_SHAPE = (1, 8, 8)
        def build_model():
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Linear(16, 2))
    """)
    with pytest.raises(BnnslimError, match="nothing to binarize.*no Conv2d"):
        binarize(BinarizeOptions(model=str(path), run=tmp_path / "run"))
    assert not (tmp_path / "run").exists()
