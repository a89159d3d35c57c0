"""torchvision architectures, trained from scratch (no downloaded weights), adapted to any
channel count and class count. ViT-B/16 resizes its input to 224x224 first, as
BackdoorBench does (its module is ``Sequential(resize, vit)``, keys ``1.*``)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from utils.models import register_model


def _kaiming_fan_out(conv: nn.Conv2d) -> None:
    """ResNet's, VGG's and MobileNet's init of a convolution."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _convnext_init(conv: nn.Conv2d) -> None:
    nn.init.trunc_normal_(conv.weight, std=0.02)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _vit_patch_init(conv: nn.Conv2d) -> None:
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / fan_in))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _replace_first_conv(conv: nn.Conv2d, in_channels: int, init: Callable[[nn.Conv2d], None]) -> nn.Conv2d:
    """``conv`` for ``in_channels`` inputs, initialised by ``init``, the rule the architecture
    applies to it (PyTorch's default init would differ from it, up to 7x in scale)."""
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    init(new)
    return new


@register_model("resnet18", stages=("layer2", "layer3", "layer4"), feature_layer="layer4")
def resnet18(num_classes: int, in_channels: int, img_size: tuple[int, int]) -> nn.Module:
    """torchvision's ResNet-18."""
    net = tvm.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = _replace_first_conv(net.conv1, in_channels, _kaiming_fan_out)
    return net


@register_model(
    "vgg19_bn", stages=("features.25", "features.38", "features.51"), feature_layer="features.51", min_size=32
)
def vgg19_bn(num_classes: int, in_channels: int, img_size: tuple[int, int]) -> nn.Module:
    """torchvision's VGG-19 with BatchNorm."""
    net = tvm.vgg19_bn(weights=None, num_classes=num_classes)
    net.features[0] = _replace_first_conv(net.features[0], in_channels, _kaiming_fan_out)
    return net


@register_model("mobilenet_v3_large", stages=("features.6", "features.12", "features.16"), feature_layer="features.16")
def mobilenet_v3_large(num_classes: int, in_channels: int, img_size: tuple[int, int]) -> nn.Module:
    """torchvision's MobileNetV3-Large."""
    net = tvm.mobilenet_v3_large(weights=None, num_classes=num_classes)
    net.features[0][0] = _replace_first_conv(net.features[0][0], in_channels, _kaiming_fan_out)
    return net


@register_model(
    "convnext_tiny", stages=("features.3", "features.5", "features.7"), feature_layer="features.7", min_size=32
)
def convnext_tiny(num_classes: int, in_channels: int, img_size: tuple[int, int]) -> nn.Module:
    """torchvision's ConvNeXt-Tiny."""
    net = tvm.convnext_tiny(weights=None, num_classes=num_classes)
    net.features[0][0] = _replace_first_conv(net.features[0][0], in_channels, _convnext_init)
    return net


class Resize(nn.Module):
    """Bilinear resize to a fixed square size (no parameters)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)


@register_model(
    "vit_b_16",
    stages=(
        "1.encoder.layers.encoder_layer_3",
        "1.encoder.layers.encoder_layer_7",
        "1.encoder.layers.encoder_layer_11",
    ),
    feature_layer=None,
)
def vit_b_16(num_classes: int, in_channels: int, img_size: tuple[int, int]) -> nn.Module:
    """torchvision's ViT-B/16; resizes its input to 224x224 first, as BackdoorBench does."""
    vit = tvm.vit_b_16(weights=None, num_classes=num_classes, image_size=224)
    vit.conv_proj = _replace_first_conv(vit.conv_proj, in_channels, _vit_patch_init)
    return nn.Sequential(Resize(224), vit)
