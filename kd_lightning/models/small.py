"""Small networks for the CPU-scale defaults: MLP, 2-D CNN, 1-D CNN, wide two-layer net.

Every model exposes `features` (the embedding before the head) and `fc` (the classifier), so the
default `embed` tap (input of the last Linear) is the penultimate representation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.errors import ConfigError, as_float, as_int
from kd_lightning.models.registry import register_model

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def _activation(name: str) -> nn.Module:
    if not isinstance(name, str) or name not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; valid: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]()


def _positive(name: str, values: Sequence[int]) -> list[int]:
    if isinstance(values, int | float | str) or not values:
        raise ConfigError(f"{name} must be a non-empty list of positive sizes, got {values!r}")
    return [as_int(f"{name} entries", v, 1) for v in values]


class Classifier(nn.Module):
    """`features` → `fc`; `forward_features` and `forward_head` split the two (timm-style)."""

    # the multi-stage taps of the CNNs (_declare_stages), declared for the type checker
    stage_taps: tuple[str, ...]
    preact_taps: tuple[str, ...]
    stem_tap: str

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        if num_classes <= 0:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        self.features = features
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_model
def mlp(
    num_classes: int,
    input_shape: tuple[int, ...],
    hidden: Sequence[int] = (100, 100),
    activation: str = "relu",
    dropout: float = 0.0,
) -> nn.Module:
    """Fully connected net on the flattened input."""
    hidden = _positive("hidden", hidden)
    dropout = as_float("dropout", dropout, 0.0, 1.0, open_high=True)
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), _activation(activation)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    return Classifier(nn.Sequential(*layers), width, num_classes)


class NTKLinear(nn.Linear):
    """Linear layer in the NTK parametrisation: N(0, 1) weights, output scaled by 1/sqrt(fan_in).

    Gradient descent then has a width-independent step size, and a very wide net stays in the kernel
    regime (Jacot et al. 2018; the setting Rahbar et al. 2020 analyse)."""

    zero_init = False  # set on an instance: start at 0 (the network's output is 0 everywhere at init)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.zero_init else nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight) / math.sqrt(self.in_features) + (
            self.bias if self.bias is not None else 0.0
        )


@register_model
def wide2(
    num_classes: int,
    input_shape: tuple[int, ...],
    width: int = 4096,
    activation: str = "relu",
    parametrization: str = "standard",
    zero_output: bool = False,
    fixed_output: bool = False,
) -> nn.Module:
    """Two-layer network of one (very) wide hidden layer: the kernel-regime student of Rahbar et al.

    `parametrization: ntk` uses NTKLinear layers (one learning rate for every width); `zero_output`
    starts the output layer at zero, so the random function at initialisation adds nothing to the
    predictions (the kernel predictor is then the plain kernel regression of the targets).

    `fixed_output` is the setting the kernel analyses study (Du et al. 2019, Arora et al. 2019):
    f(x) = m^-1/2 Σ_r a_r σ(w_r·x / √d), no biases, output weights a_r ∈ {±1} fixed (never trained), only
    the first layer trained. The hidden units come in pairs with the same w_r and opposite a_r (the
    "doubling" trick), so f_0 = 0 (to float rounding) without shrinking the initialisation; the kernel is unchanged."""
    width = as_int("width", width, 1)
    if fixed_output:
        if parametrization != "ntk" or zero_output or width % 2:
            raise ConfigError(
                "wide2 fixed_output=true needs parametrization=ntk, zero_output=false and an even width "
                f"(got parametrization={parametrization!r}, zero_output={zero_output}, width={width})"
            )
        return _fixed_output_wide2(num_classes, input_shape, width, activation)
    if parametrization == "standard":
        return mlp(num_classes, input_shape, hidden=[width], activation=activation)
    if parametrization != "ntk":
        raise ConfigError(f"wide2 parametrization={parametrization!r}; valid: ntk, standard")
    hidden = nn.Sequential(nn.Flatten(), NTKLinear(math.prod(input_shape), width), _activation(activation))
    model = Classifier(hidden, width, num_classes)
    model.fc = NTKLinear(width, num_classes)
    if zero_output:
        model.fc.zero_init = True
        model.fc.reset_parameters()
    return model


def _fixed_output_wide2(
    num_classes: int, input_shape: tuple[int, ...], width: int, activation: str
) -> nn.Module:
    first = NTKLinear(math.prod(input_shape), width, bias=False)
    half = width // 2
    with torch.no_grad():
        first.weight[half:] = first.weight[:half]
        signs = torch.randint(0, 2, (num_classes, half)).float() * 2 - 1
    model = Classifier(nn.Sequential(nn.Flatten(), first, _activation(activation)), width, num_classes)
    model.fc = NTKLinear(width, num_classes, bias=False)
    with torch.no_grad():
        model.fc.weight.copy_(torch.cat([signs, -signs], 1))
    model.fc.weight.requires_grad_(False)  # fixed: the optimiser skips it (no gradient), weight decay too
    return model


def _conv_block(
    conv: type[nn.Module], bn: type[nn.Module], cin: int, cout: int, k: int, stride: int
) -> list[nn.Module]:
    # not in place: the batch norm's output is the `preact1` tap (AB, ReviewKD) and must survive the ReLU
    return [conv(cin, cout, k, stride=stride, padding=k // 2, bias=False), bn(cout), nn.ReLU()]


def _declare_stages(model: Classifier) -> Classifier:
    """Each conv block is a stage: its output is the block's ReLU (`stage<k>`), its pre-activation the
    block's batch norm (`preact<k>`), and `stem` is the network's input (the input of the first block), so
    that multi-stage terms (AT, NST, FSP, AB, ReviewKD) read every block of these CNNs too."""
    named = list(model.named_modules())
    model.stage_taps = tuple(n for n, m in named if isinstance(m, nn.ReLU))
    model.preact_taps = tuple(n for n, m in named if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d))
    model.stem_tap = next(n for n, m in named if isinstance(m, nn.Conv1d | nn.Conv2d)) + ":input"
    return model


@register_model
def cnn(
    num_classes: int,
    input_shape: tuple[int, ...],
    channels: Sequence[int] = (32, 64),
    kernel_size: int = 3,
    pool: bool = True,
) -> nn.Module:
    """Conv-BN-ReLU blocks (2×2 max-pool between blocks while the map is large enough), global average pool."""
    if len(input_shape) != 3:
        raise ConfigError(
            f"cnn needs image inputs (C, H, W), got input_shape={tuple(input_shape)}; use cnn1d or mlp"
        )
    channels = _positive("channels", channels)
    kernel_size = as_int("kernel_size", kernel_size, 1)
    layers: list[nn.Module] = []
    cin, size = input_shape[0], min(input_shape[1:])
    for i, c in enumerate(channels):
        layers += _conv_block(nn.Conv2d, nn.BatchNorm2d, cin, c, kernel_size, 1)
        if pool and i < len(channels) - 1 and size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        cin = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return _declare_stages(Classifier(nn.Sequential(*layers), cin, num_classes))


@register_model
def cnn1d(
    num_classes: int,
    input_shape: tuple[int, ...],
    channels: Sequence[int] = (32, 32, 32),
    kernel_size: int = 5,
    stride: int = 2,
) -> nn.Module:
    """Strided 1-D convolutions then a flattened map (keeps position, which MNIST-1D needs)."""
    if len(input_shape) != 2:
        raise ConfigError(f"cnn1d needs 1-D signals (C, L), got input_shape={tuple(input_shape)}")
    channels = _positive("channels", channels)
    kernel_size, stride = as_int("kernel_size", kernel_size, 1), as_int("stride", stride, 1)
    layers: list[nn.Module] = []
    cin = input_shape[0]
    for c in channels:
        layers += _conv_block(nn.Conv1d, nn.BatchNorm1d, cin, c, kernel_size, stride)
        cin = c
    layers.append(nn.Flatten())
    body = nn.Sequential(*layers)
    with torch.no_grad():
        dim = body.eval()(torch.zeros(1, *input_shape)).shape[1]
    body.train()
    return _declare_stages(Classifier(body, dim, num_classes))
