"""A small CNN for 28x28 and 8x8 inputs (MNIST, Fashion-MNIST, digits): three stages of
3x3 convolutions with BatchNorm and ReLU, global average pooling and a linear layer."""

from __future__ import annotations

from torch import nn

from utils.models import register_model


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32):
        super().__init__()
        w = width
        self.layer1 = nn.Sequential(*_conv(in_channels, w), nn.MaxPool2d(2))
        self.layer2 = nn.Sequential(*_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(*_conv(2 * w, 4 * w))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(out).flatten(1))


@register_model("cnn", stages=("layer1", "layer2", "layer3"), feature_layer="layer3", min_size=4)
def cnn(num_classes: int, in_channels: int, img_size: tuple[int, int]) -> nn.Module:
    """A small CNN for 28x28 and 8x8 inputs (MNIST, Fashion-MNIST, digits)."""
    return SmallCNN(num_classes, in_channels)
