"""RepDistiller's CIFAR ResNets, Wide ResNets, VGGs and ResNet50, under its names and parameter names.

Each network has the same parameters as RepDistiller's model of the same name (state_dict names and
shapes; checked in tests/test_cifar_zoo.py), so a released teacher file loads and gives the same logits.
They differ from RepDistiller's in two ways that change no result on 32×32 inputs: any number of input
channels, and pooling as a module (`avgpool`, adaptive) so that any input size works and the `map` tap
finds the last feature map.

- resnet{8,14,20,32,44,56,110}: He et al.'s CIFAR ResNet (16-16-32-64 filters, 6n+2 layers);
  resnet{8,32}x4: the same with 32-64-128-256 filters (RepDistiller's widening).
- ResNet50: He et al.'s bottleneck ResNet-50 with a 3×3 stride-1 stem and no max-pool (RepDistiller's
  `resnetv2.py`); unlike torchvision's `resnet50` (reachable with `student=torchvision`).
- wrn_{16,40}_{1,2}: Zagoruyko & Komodakis' pre-activation Wide ResNet.
- vgg{8,11,13,16,19}: Simonyan & Zisserman's VGG with batch norm, one linear layer on globally pooled
  512 channels; the fourth max-pool runs only on 64×64 inputs, as in RepDistiller (so on 32×32 inputs the
  last block sees 4×4 maps). torchvision's ImageNet VGGs stay reachable with `student=torchvision`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.models.registry import register_model


def _channels(input_shape: tuple[int, ...], name: str) -> int:
    if len(input_shape) != 3:
        raise ConfigError(f"{name} needs image inputs (C, H, W), got input_shape={tuple(input_shape)}")
    return input_shape[0]


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    """The 1×1 projection shortcut of a residual block (`downsample` / `shortcut` in the reference)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def _init_he_fan_out(model: nn.Module) -> None:
    """RepDistiller's ResNet initialisation: Kaiming (fan-out) convolutions, unit-scale batch norms."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _init_normal_fan_out(model: nn.Module, linear_std: float | None) -> None:
    """RepDistiller's WRN/VGG/MobileNet initialisation: N(0, 2/fan-out) convolutions, zero biases;
    linear weights N(0, linear_std) when given (VGG, MobileNet), PyTorch's default otherwise (WRN)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = _conv_bn(cin, cout, stride) if stride != 1 or cin != cout else None
        self.preact = nn.Identity()  # the sum before the last ReLU: the `preact<k>` taps (AB, ReviewKD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.preact(out + identity))


class CifarResNet(nn.Module):
    # the feature maps RepDistiller's multi-layer terms (AT, NST) read: each stage's output (taps stage1..)
    stage_taps = ("layer1", "layer2", "layer3")

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
        _init_he_fan_out(self)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        # An empty Sequential is the identity and has no parameters, as in the reference.
        self.shortcut = _conv_bn(cin, cout, stride) if stride != 1 or cin != cout else nn.Sequential()
        self.preact = nn.Identity()  # the sum before the last ReLU: the `preact<k>` taps (AB, ReviewKD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(self.preact(out + self.shortcut(x)))


class BottleneckResNet(nn.Module):
    """ResNet-50 for 32×32 inputs: 3×3 stride-1 stem, no max-pool, stages of 64-128-256-512 bottlenecks."""

    stage_taps = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, blocks: list[int], num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            layers = []
            for j in range(n):
                layers.append(Bottleneck(cin, planes, (1 if i == 0 else 2) if j == 0 else 1))
                cin = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)
        _init_he_fan_out(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


class WideBlock(nn.Module):
    """Pre-activation wide block; the projection shortcut reads the activated input."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)  # noqa: N815  (the released files' name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = F.relu(self.bn2(self.conv1(o)))
        if self.dropout > 0:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv2(y)
        return y + (x if self.convShortcut is None else self.convShortcut(o))


class WideStage(nn.Module):
    """A stage of wide blocks under `.layer` (the reference's `NetworkBlock`, hence `block1.layer.0.…`)."""

    def __init__(self, cin: int, cout: int, blocks: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout)
                for i in range(blocks)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    stage_taps = ("block1", "block2", "block3")
    # pre-activation blocks: RepDistiller's `preact` features pass each stage's output through the batch
    # norm that reads it next (the next stage's first, or the final one)
    preact_taps = ("block2.layer.0.bn1", "block3.layer.0.bn1", "bn1")

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ConfigError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = WideStage(widths[0], widths[1], n, 1, dropout)
        self.block2 = WideStage(widths[1], widths[2], n, 2, dropout)
        self.block3 = WideStage(widths[2], widths[3], n, 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_normal_fan_out(self, linear_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(F.relu(self.bn1(x))), 1))


# Channels of the five VGG blocks (a max-pool between blocks): "S" is RepDistiller's 8-layer VGG,
# A/B/D/E are Simonyan & Zisserman's configurations for 11/13/16/19 layers.
_VGG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _vgg_block(cin: int, widths: list[int]) -> nn.Sequential:
    """conv-bn-relu for each width, without the block's final ReLU (applied by VGG.forward)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    # RepDistiller's VGG features are the blocks' outputs after their ReLU: these modules apply it
    stage_taps = ("act1", "act2", "act3", "act4")

    def __init__(self, blocks: list[list[int]], num_classes: int, in_channels: int):
        super().__init__()
        cins = [in_channels] + [b[-1] for b in blocks[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _vgg_block(c, b) for c, b in zip(cins, blocks, strict=True)
        )
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(2, 2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.act0, self.act1, self.act2, self.act3, self.act4 = (nn.ReLU() for _ in range(5))
        self.classifier = nn.Linear(blocks[-1][-1], num_classes)
        _init_normal_fan_out(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(self.act0(self.block0(x)))
        x = self.pool1(self.act1(self.block1(x)))
        x = self.pool2(self.act2(self.block2(x)))
        x = self.act3(self.block3(x))
        if h == 64:  # RepDistiller pools a fourth time only for 64×64 inputs
            x = self.pool3(x)
        x = self.act4(self.block4(x))
        return self.classifier(torch.flatten(self.pool4(x), 1))


_SMALL = [16, 16, 32, 64]
_X4 = [32, 64, 128, 256]


def _resnet(depth: int, filters: list[int], name: str):
    def build(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        return CifarResNet(depth, filters, num_classes, _channels(input_shape, name))

    build.__name__ = name
    build.__doc__ = f"RepDistiller's {name}: CIFAR ResNet of depth {depth}, filters {filters}."
    return register_model(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _resnet(_depth, _SMALL, f"resnet{_depth}")
_resnet(8, _X4, "resnet8x4")
_resnet(32, _X4, "resnet32x4")


@register_model
def ResNet50(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:  # noqa: N802  (RepDistiller's name)
    return BottleneckResNet([3, 4, 6, 3], num_classes, _channels(input_shape, "ResNet50"))


def _wrn(depth: int, widen: int):
    name = f"wrn_{depth}_{widen}"

    def build(num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0) -> nn.Module:
        return WideResNet(depth, widen, num_classes, _channels(input_shape, name), dropout)

    build.__name__ = name
    build.__doc__ = f"RepDistiller's {name}: Wide ResNet of depth {depth}, widening factor {widen}."
    return register_model(build)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _wrn(_depth, _widen)


def _vgg(name: str):
    def build(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        return VGG(_VGG[name], num_classes, _channels(input_shape, name))

    build.__name__ = name
    build.__doc__ = f"RepDistiller's {name} (with batch norm): blocks {_VGG[name]}."
    return register_model(build)


for _name in _VGG:
    _vgg(_name)
