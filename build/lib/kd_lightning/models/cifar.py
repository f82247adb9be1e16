"""CIFAR-style ResNets and Wide ResNets, with the depths and widths RepDistiller uses.

resnet{8,20,32} (16-16-32-64 filters), resnet{8,32}x4 (32-64-128-256), wrn_{16,40}_2. They accept any
number of input channels and any input size (global average pool before `fc`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, filters: list[int], num_classes: int, in_channels: int):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, filters[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.layer1 = self._stage(filters[0], filters[1], n, 1)
        self.layer2 = self._stage(filters[1], filters[2], n, 2)
        self.layer3 = self._stage(filters[2], filters[3], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(blocks)]
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class WideBlock(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.dropout > 0:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ConfigError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = self._stage(widths[0], widths[1], n, 1, dropout)
        self.block2 = self._stage(widths[1], widths[2], n, 2, dropout)
        self.block3 = self._stage(widths[2], widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            *[
                WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout)
                for i in range(blocks)
            ]
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return torch.flatten(self.avgpool(F.relu(self.bn(x))), 1)

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _channels(input_shape: tuple[int, ...], name: str) -> int:
    if len(input_shape) != 3:
        raise ConfigError(f"{name} needs image inputs (C, H, W), got input_shape={tuple(input_shape)}")
    return input_shape[0]


_SMALL = [16, 16, 32, 64]
_X4 = [32, 64, 128, 256]


@register_model
def resnet8(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return CifarResNet(8, _SMALL, num_classes, _channels(input_shape, "resnet8"))


@register_model
def resnet20(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return CifarResNet(20, _SMALL, num_classes, _channels(input_shape, "resnet20"))


@register_model
def resnet32(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return CifarResNet(32, _SMALL, num_classes, _channels(input_shape, "resnet32"))


@register_model
def resnet8x4(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return CifarResNet(8, _X4, num_classes, _channels(input_shape, "resnet8x4"))


@register_model
def resnet32x4(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return CifarResNet(32, _X4, num_classes, _channels(input_shape, "resnet32x4"))


@register_model
def wrn_16_2(num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0) -> nn.Module:
    return WideResNet(16, 2, num_classes, _channels(input_shape, "wrn_16_2"), dropout)


@register_model
def wrn_40_2(num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0) -> nn.Module:
    return WideResNet(40, 2, num_classes, _channels(input_shape, "wrn_40_2"), dropout)
