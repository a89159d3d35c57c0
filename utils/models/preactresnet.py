"""PreAct-ResNet18 (He et al. 2016, "Identity Mappings in Deep Residual Networks") as the
backdoor literature trains it on 32x32 inputs: a 3x3 stem with stride 1, four stages of
two pre-activation blocks, adaptive average pooling, a linear head. Module names follow
BackdoorBench's, so its state_dicts load as they are (prefixed with ``net.``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from utils.models import register_model


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        identity = self.shortcut(pre) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + identity


class PreActResNet(nn.Module):
    def __init__(self, blocks_per_stage: tuple[int, ...], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        planes, layers, in_planes = (64, 128, 256, 512), [], 64
        for i, (width, n) in enumerate(zip(planes, blocks_per_stage)):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            blocks = []
            for s in strides:
                blocks.append(PreActBlock(in_planes, width, s))
                in_planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).flatten(1))


@register_model("preactresnet18", stages=("layer2", "layer3", "layer4"), feature_layer="layer4")
def preactresnet18(num_classes: int, in_channels: int, img_size: tuple[int, int]) -> nn.Module:
    """PreAct-ResNet-18, BackdoorBench's default architecture."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels)
