"""Small models for pruning tests: plain, residual and concat, binarized and traced."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bnnslim.binary.convert import apply_binarization, plan_binarization
from bnnslim.default_plugins.schemes import bnnslim_schemes
from bnnslim.graph import build_graph
from bnnslim.prune.groups import PrunableGroup, find_groups

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example_factory(file: str, name: str = "tiny") -> Callable[[], nn.Module]:
    spec = importlib.util.spec_from_file_location(f"example_{file}", EXAMPLES / file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return getattr(module, name)


class ConcatNet(nn.Module):
    """Two branches concatenated (Inception/DenseNet-style), then a conv and a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh())
        self.a = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.Hardtanh())
        self.b = nn.Sequential(nn.Conv2d(8, 10, 1, bias=False), nn.BatchNorm2d(10), nn.Hardtanh())
        self.mix = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.Hardtanh())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12 * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.head(self.mix(x))


@dataclass
class Binarized:
    model: nn.Module
    example: torch.Tensor
    groups: list[PrunableGroup]


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give BatchNorms non-trivial statistics so that masked channels would leak as constants."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


def binarized(factory: Callable[[], nn.Module], shape: tuple[int, ...] = (1, 28, 28)) -> Binarized:
    torch.manual_seed(0)
    model = factory(in_channels=shape[0])  # type: ignore[call-arg]
    randomize_bn(model)
    example = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    plan = plan_binarization(model, example)
    xnor = next(s for s in bnnslim_schemes() if s.name == "xnor")
    apply_binarization(model, plan.binary, xnor)
    model.eval()
    graph = build_graph(model, example)
    return Binarized(model, example, find_groups(model, graph, example).groups)


MODELS: dict[str, Callable[[], Binarized]] = {
    "plain": lambda: binarized(example_factory("small_cnn.py")),
    "nin": lambda: binarized(example_factory("nin.py"), (1, 28, 28)),
    "vgg": lambda: binarized(example_factory("vgg11.py"), (1, 28, 28)),
    "residual": lambda: binarized(example_factory("resnet18.py"), (1, 28, 28)),
    "concat": lambda: binarized(ConcatNet),
}


def torchvision_model(name: str) -> Callable[..., nn.Module]:
    """A torchvision classifier with 10 classes (random weights)."""
    import torchvision

    extra = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}

    def build(in_channels: int = 3) -> nn.Module:
        return getattr(torchvision.models, name)(num_classes=10, **extra)

    return build


TORCHVISION = ["resnet18", "resnet50", "vgg11_bn", "densenet121", "mobilenet_v2", "googlenet"]
