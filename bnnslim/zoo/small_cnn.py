"""A small CNN for 28x28 grey images (the bundled Fashion-MNIST subset).

An ordinary PyTorch model: bnnslim makes the inner convs binary. The blocks use
Conv -> BatchNorm -> Hardtanh: the next binary conv takes sign() of its input,
so a signed activation (Hardtanh, PReLU or none) keeps both signs, where ReLU
would leave only {0, +1}.
"""

from torch import nn

INPUT_SHAPE = (1, 28, 28)


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.Hardtanh())


def build_model(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> nn.Module:
    c = [max(4, int(n * width)) for n in (16, 32, 64, 64)]
    return nn.Sequential(
        block(in_channels, c[0]),
        block(c[0], c[1]),
        nn.MaxPool2d(2),
        block(c[1], c[2]),
        nn.MaxPool2d(2),
        block(c[2], c[3]),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c[3], num_classes),
    )


def tiny(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A half-width variant for fast tests."""
    return build_model(num_classes, in_channels, width=0.5)
