"""Trainable projectors that map a student feature's shape onto a teacher feature's shape.

Sized from the shapes seen on one dry batch: Linear for vectors, 1×1 conv (+ bilinear resize) for maps;
`convreg` is RepDistiller's FitNet regressor.
They train with the student and are dropped from the exported student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError

ADAPTER_KINDS = ("auto", "none", "linear", "mlp", "convreg")


class Adapter(nn.Module):
    """Map (N, *student_shape) → (N, *teacher_shape)."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], kind: str = "linear"):
        super().__init__()
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        s, t = self.student_shape, self.teacher_shape
        self.proj: nn.Module
        self.spatial = len(s) >= 2 and len(t) >= 2 and len(s) == len(t)
        if self.spatial:
            conv = nn.Conv2d if len(s) == 3 else nn.Conv1d if len(s) == 2 else None
            if conv is None:
                raise ConfigError(f"no adapter maps feature maps of shape {s} to {t}: only 1-D and 2-D maps")
            if kind == "mlp":
                self.proj = nn.Sequential(conv(s[0], t[0], 1), nn.ReLU(inplace=True), conv(t[0], t[0], 1))
            else:
                self.proj = nn.Sequential(
                    conv(s[0], t[0], 1, bias=False), (nn.BatchNorm2d if len(s) == 3 else nn.BatchNorm1d)(t[0])
                )
        else:
            din, dout = _numel(s), _numel(t)
            if kind == "mlp":
                self.proj = nn.Sequential(nn.Linear(din, dout), nn.ReLU(inplace=True), nn.Linear(dout, dout))
            else:
                self.proj = nn.Linear(din, dout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial:
            y = self.proj(x)
            if y.shape[2:] != self.teacher_shape[1:]:
                mode = "bilinear" if y.dim() == 4 else "linear"
                y = F.interpolate(y, size=self.teacher_shape[1:], mode=mode, align_corners=False)
            return y
        return self.proj(x.flatten(1)).view(x.shape[0], *self.teacher_shape)


class ConvReg(nn.Module):
    """RepDistiller's FitNet regressor: a convolution chosen by the two heights (3×3 stride 2 when the
    student's is twice the teacher's, a 4×4 stride-2 transposed convolution when half, otherwise a
    (1 + ΔH) × (1 + ΔW) kernel), then batch norm and (`relu`, FitNet's; AB's connector has none) ReLU.
    Always applied, even to equal shapes. 1-D maps (C, L) get the same layers in one dimension fewer."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], relu: bool = True):
        super().__init__()
        if len(student_shape) not in (2, 3) or len(teacher_shape) != len(student_shape):
            raise ConfigError(
                f"adapter: convreg maps feature maps ((C, H, W) or (C, L)); got {tuple(student_shape)} → "
                f"{tuple(teacher_shape)}: use adapter: auto"
            )
        two = len(student_shape) == 3
        self.conv: nn.Module
        conv, deconv = (nn.Conv2d, nn.ConvTranspose2d) if two else (nn.Conv1d, nn.ConvTranspose1d)
        (sc, *s_size), (tc, *t_size) = student_shape, teacher_shape
        if s_size[0] == 2 * t_size[0]:
            self.conv = conv(sc, tc, 3, stride=2, padding=1)
        elif 2 * s_size[0] == t_size[0]:
            self.conv = deconv(sc, tc, 4, stride=2, padding=1)
        elif all(a >= b for a, b in zip(s_size, t_size, strict=True)):
            grow = [1 + a - b for a, b in zip(s_size, t_size, strict=True)]
            self.conv = nn.Conv2d(sc, tc, (grow[0], grow[1])) if two else nn.Conv1d(sc, tc, grow[0])
        else:
            raise ConfigError(
                f"adapter: convreg cannot map a {'×'.join(map(str, s_size))} student map onto a "
                f"{'×'.join(map(str, t_size))} teacher map (it enlarges by 2 only); use adapter: auto"
            )
        self.bn = (nn.BatchNorm2d if two else nn.BatchNorm1d)(tc)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return F.relu(y) if self.relu else y


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_adapter(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], kind: str = "auto"
) -> nn.Module:
    """`auto`: identity when shapes already match, else a projector; `none`: shapes must match."""
    if kind not in ADAPTER_KINDS:
        raise ConfigError(f"unknown adapter {kind!r}; valid: {', '.join(ADAPTER_KINDS)}")
    if kind == "convreg":
        return ConvReg(tuple(student_shape), tuple(teacher_shape))
    same = tuple(student_shape) == tuple(teacher_shape)
    if kind == "none" or (kind == "auto" and same):
        if not same:
            raise ConfigError(
                f"adapter: none, but student feature {tuple(student_shape)} and teacher feature "
                f"{tuple(teacher_shape)} differ; use adapter: auto"
            )
        return nn.Identity()
    return Adapter(student_shape, teacher_shape, "mlp" if kind == "mlp" else "linear")
