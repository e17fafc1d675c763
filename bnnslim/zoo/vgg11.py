"""VGG-11 with batch norm in its CIFAR form (Simonyan & Zisserman 2015).

Four max-pools instead of five and a global average pool before a single linear
classifier, so that 28x28 and 32x32 inputs both work.
"""

from torch import nn

INPUT_SHAPE = (3, 32, 32)
CONFIG: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512]


def build_model(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    layers: list[nn.Module] = []
    cin = in_channels
    for item in CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        cout = max(4, int(int(item) * width))
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.Hardtanh()]
        cin = cout
    return nn.Sequential(
        nn.Sequential(*layers),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(cin, num_classes),
    )


def tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A one-eighth-width variant for fast tests."""
    return build_model(num_classes, in_channels, width=0.125)
