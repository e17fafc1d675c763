"""ResNet-18 in its CIFAR form (He et al. 2016): a 3x3 stem without max-pool,
four stages of two basic blocks, global average pooling, one linear layer.

Blocks use Hardtanh after each BatchNorm and after the residual add (as in
Bi-Real Net's binary ResNets, a signed activation keeps the information that
the next sign() reads).
"""

import torch
from torch import nn

INPUT_SHAPE = (3, 32, 32)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.Hardtanh()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.Hardtanh()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        c = [max(4, int(n * width)) for n in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c[0], 3, padding=1, bias=False), nn.BatchNorm2d(c[0]),
                                  nn.Hardtanh())
        stages = []
        cin = c[0]
        for i, cout in enumerate(c):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_model(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return ResNet18(num_classes, in_channels, width)


def tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A one-eighth-width variant for fast tests."""
    return ResNet18(num_classes, in_channels, width=0.125)
