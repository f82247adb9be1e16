"""RepDistiller's mobile CIFAR students, under its names and parameter names: MobileNetV2, ShuffleV1, ShuffleV2.

- MobileNetV2 (Sandler et al.): RepDistiller's `mobile_half`, expansion 6 and width multiplier 0.5 (stem
  16 channels, blocks 8-12-16-32-48-80-160, a 1×1 convolution to 1280), stride 2 in the stem.
- ShuffleV1 (Zhang et al.): groups 3, stages of 240-480-960 channels with 4-8-4 units, a 1×1 stem of 24
  channels; the first unit's first 1×1 convolution is ungrouped, as in the paper.
- ShuffleV2 (Ma et al.): size 1× (116-232-464 channels, 3-7-3 units, 1024 before the classifier), a 1×1
  stem of 24 channels and no max-pool (CIFAR inputs).

Same parameters as the reference (tests/test_cifar_zoo.py); pooling is an adaptive `avgpool` module, so
any input size works and the `map` tap finds the last feature map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.models.cifar import _channels, _init_normal_fan_out
from kd_lightning.models.registry import register_model


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1×1), depthwise 3×3, project (1×1, linear); identity shortcut when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, 1, 0, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class InvertedResidualNet(nn.Module):
    """MobileNetV2's body: a strided 3×3 stem, inverted residual stages, a 1×1 convolution, a classifier."""

    stage_taps = ("blocks.1", "blocks.2", "blocks.4", "blocks.6")  # RepDistiller's f1..f4

    # (expansion, channels, units, stride of the first unit); expansion None means the model's own
    _SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
                (None, 160, 3, 2), (None, 320, 1, 1))  # fmt: skip

    def __init__(self, expand: int, width: float, num_classes: int, in_channels: int):
        super().__init__()
        cin = int(32 * width)
        self.conv1 = _conv_bn_relu(in_channels, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in self._SETTING:
            cout = int(c * width)
            units = []
            for i in range(n):
                units.append(InvertedResidual(cin, cout, s if i == 0 else 1, t or expand))
                cin = cout
            self.blocks.append(nn.Sequential(*units))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, last, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        _init_normal_fan_out(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(torch.flatten(self.avgpool(self.conv2(x)), 1))


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle: (N, g·k, H, W) → (N, k·g, H, W), interleaving the groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnitV1(nn.Module):
    """Grouped 1×1, shuffle, depthwise 3×3, grouped 1×1; stride 2 concatenates an average-pooled input."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid = cout // 4
        self.first_groups = 1 if cin == 24 else groups  # the stem's 24 channels are not grouped
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class _ShuffleNet(nn.Module):
    """What ShuffleNet v1 and v2 share here: a 1×1 stem of 24 channels and three stages, `layer1..3`."""

    stage_taps = ("layer1", "layer2", "layer3")

    def __init__(
        self,
        in_channels: int,
        make_stage: Callable[[int, int, int], nn.Sequential],
        widths: list[int],
        units: list[int],
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin, stages = 24, []
        for width, n in zip(widths, units, strict=True):
            stages.append(make_stage(cin, width, n))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def stages(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))


class ShuffleNetV1(_ShuffleNet):
    def __init__(self, widths: list[int], units: list[int], groups: int, num_classes: int, in_channels: int):
        def stage(cin: int, width: int, n: int) -> nn.Sequential:
            # the first unit is strided and concatenates its pooled input, so it makes width - cin channels
            first = ShuffleUnitV1(cin, width - cin, 2, groups)
            return nn.Sequential(first, *[ShuffleUnitV1(width, width, 1, groups) for _ in range(n - 1)])

        super().__init__(in_channels, stage, widths, units)
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.avgpool(self.stages(x)), 1))


class ShuffleUnitV2(nn.Module):
    """Split the channels in half; the second half goes through 1×1, depthwise 3×3, 1×1; concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1] // 2
        keep, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return _shuffle(torch.cat([keep, out], 1), 2)


class DownUnitV2(nn.Module):
    """Spatial down-sampling unit: both branches stride 2, each makes half the output channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return _shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(_ShuffleNet):
    def __init__(self, widths: list[int], units: list[int], last: int, num_classes: int, in_channels: int):
        def stage(cin: int, width: int, n: int) -> nn.Sequential:
            return nn.Sequential(DownUnitV2(cin, width), *[ShuffleUnitV2(width) for _ in range(n)])

        super().__init__(in_channels, stage, widths, units)
        self.conv2 = nn.Conv2d(widths[-1], last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(self.stages(x))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register_model
def MobileNetV2(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:  # noqa: N802  (RepDistiller's name)
    """RepDistiller's `mobile_half`: MobileNetV2 with expansion 6 and width 0.5."""
    return InvertedResidualNet(6, 0.5, num_classes, _channels(input_shape, "MobileNetV2"))


@register_model
def ShuffleV1(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:  # noqa: N802  (RepDistiller's name)
    """ShuffleNet v1, groups 3, for CIFAR."""
    return ShuffleNetV1([240, 480, 960], [4, 8, 4], 3, num_classes, _channels(input_shape, "ShuffleV1"))


@register_model
def ShuffleV2(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:  # noqa: N802  (RepDistiller's name)
    """ShuffleNet v2 1×, for CIFAR."""
    return ShuffleNetV2([116, 232, 464], [3, 7, 3], 1024, num_classes, _channels(input_shape, "ShuffleV2"))
