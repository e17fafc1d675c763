"""Network-in-Network for CIFAR (Lin et al. 2014), as binarized by XNOR-Net and
by Xu et al. (CVPR 2019), whose public code prunes exactly this model.

Three stages of a 5x5 (or 3x3) conv followed by two 1x1 convs; the last 1x1 conv
is the classifier, followed by global average pooling. Blocks are
Conv -> BatchNorm -> Hardtanh (see small_cnn.py for why not ReLU).
"""

from torch import nn

INPUT_SHAPE = (3, 32, 32)


def block(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.Hardtanh()]


def build_model(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    w = lambda n: max(4, int(n * width))  # noqa: E731
    return nn.Sequential(
        *block(in_channels, w(192), 5), *block(w(192), w(160), 1), *block(w(160), w(96), 1),
        nn.MaxPool2d(3, stride=2, padding=1),
        *block(w(96), w(192), 5), *block(w(192), w(192), 1), *block(w(192), w(192), 1),
        nn.AvgPool2d(3, stride=2, padding=1),
        *block(w(192), w(192), 3), *block(w(192), w(192), 1),
        nn.Conv2d(w(192), num_classes, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A one-eighth-width variant for fast tests."""
    return build_model(num_classes, in_channels, width=0.125)
