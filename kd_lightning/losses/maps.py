"""Methods on feature maps (B, C, H, W) or (B, C, L). Channel counts may differ between student and
teacher (`shape_free`). Spatial sizes may differ: AT (mode code) and NST average-pool the larger map to the
smaller's size (RepDistiller's computation); AT's paper mode resizes the student map to the teacher's, and
ICKD's channel Gram matrix does not depend on the spatial size at all.

- AT, Attention Transfer (Zagoruyko & Komodakis, ICLR 2017): Q = Σ_c |A_c|^p flattened and
  L2-normalised per sample. `mode: code` (the authors' released code and RepDistiller) is the mean
  of (Q̂_S − Q̂_T)² over batch and positions, used with weight β = 1000; `mode: paper` is the
  batch mean of ‖Q̂_S − Q̂_T‖₂ (eq. 2 without β/2).
- NST, Neuron Selectivity Transfer (Huang & Wang, 2017): each channel's spatial response, L2-normalised,
  is a sample; the loss is the squared MMD between the student's and the teacher's channel samples with
  the polynomial kernel k(x, y) = (xᵀy + c)^d (paper: d = 2, c = 0), averaged over the batch.
- ICKD, inter-channel correlation (Liu et al., ICCV 2021), as the authors' code computes it
  (Cifar100/distiller_zoo/ICKD.py): the student map goes through their `Embed`, a trainable 1 × 1
  convolution without bias to the teacher's channel count followed by a batch norm (part of the loss);
  per sample the channel Gram matrix G = F Fᵀ (C × C, positions summed), each row L2-normalised; loss
  Σ (G_S − G_T)² / (C_T · B). Nothing is resized: G is C × C whatever the spatial sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError, as_float, as_int
from kd_lightning.losses.protocol import PreStage
from kd_lightning.losses.registry import register_loss
from kd_lightning.tensors import add_all


def _check_maps(method: str, *maps: torch.Tensor) -> None:
    for x in maps:
        _check_map(x, method)


def _check_map(x: torch.Tensor, method: str) -> None:
    if x.dim() not in (3, 4):
        raise ConfigError(
            f"{method} needs feature maps (B, C, L) or (B, C, H, W), got a tensor of shape {tuple(x.shape)}; "
            "tap a convolutional layer (e.g. student_tap=map, teacher_tap=map)"
        )


def match_size(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The student map resized (bilinear / linear) to the teacher map's spatial size."""
    if s.shape[2:] == t.shape[2:]:
        return s
    mode = "bilinear" if s.dim() == 4 else "linear"
    return F.interpolate(s, size=t.shape[2:], mode=mode, align_corners=False)


def pool_to_smaller(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The larger of two maps average-pooled to the smaller's spatial size (RepDistiller's AT, NST, FT and FSP)."""
    if s.shape[2:] == t.shape[2:]:
        return s, t
    if math.prod(s.shape[2:]) > math.prod(t.shape[2:]):
        return _pool_to(s, t.shape[2:]), t
    return s, _pool_to(t, s.shape[2:])


def _pool_to(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """`x` average-pooled to the spatial `size`: images (2-D) or signals (1-D)."""
    if x.dim() == 4:
        return F.adaptive_avg_pool2d(x, (size[0], size[1]))
    return F.adaptive_avg_pool1d(x, size[0])


@register_loss("at")
class AttentionTransfer(nn.Module):
    shape_free = True

    def __init__(self, p: float = 2.0, mode: str = "code"):
        super().__init__()
        self.p = as_float("at p", p, 0.0, open_low=True)
        if mode not in ("code", "paper"):
            raise ConfigError(f"at mode={mode!r}; valid: code, paper")
        self.mode = mode

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float().abs().pow(self.p).sum(1).flatten(1), dim=1)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_maps("at", s, t)
        if self.mode == "code":  # RepDistiller: the larger map pooled down, squared differences averaged
            s, t = pool_to_smaller(s.float(), t.float())
            return (self.attention(s) - self.attention(t)).pow(2).mean()
        qs, qt = self.attention(match_size(s.float(), t)), self.attention(t)
        return (qs - qt).norm(p=2, dim=1).mean()


@register_loss("nst")
class NeuronSelectivityTransfer(nn.Module):
    shape_free = True

    def __init__(self, degree: int = 2, c: float = 0.0):
        super().__init__()
        self.degree = as_int("nst degree", degree, 1)
        self.c = as_float("nst c", c, 0.0)

    def _k(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.transpose(1, 2) + self.c).pow(self.degree).mean((1, 2))

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_maps("nst", s, t)
        s, t = pool_to_smaller(s.float(), t.float())  # as RepDistiller (the weight 50 is its)
        fs = F.normalize(s.flatten(2), dim=2)  # (B, C_s, HW)
        ft = F.normalize(t.flatten(2), dim=2)
        return (self._k(ft, ft) + self._k(fs, fs) - 2 * self._k(fs, ft)).mean()


@register_loss("ickd")
class ICKD(nn.Module):
    shape_free = True  # the loss owns its channel projection; G does not depend on the spatial size

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        if len(student_shape) not in (2, 3) or len(teacher_shape) != len(student_shape):
            raise ConfigError(
                f"ickd needs feature maps on both sides ((C, L) or (C, H, W)), got student {tuple(student_shape)} "
                f"and teacher {tuple(teacher_shape)}; tap a convolutional layer (student_tap=map, teacher_tap=map)"
            )
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if len(student_shape) == 3 else (nn.Conv1d, nn.BatchNorm1d)
        self.embed = nn.Sequential(
            conv(student_shape[0], teacher_shape[0], kernel_size=1, bias=False), bn(teacher_shape[0])
        )

    @staticmethod
    def gram(x: torch.Tensor) -> torch.Tensor:
        f = x.float().flatten(2)
        return F.normalize(f @ f.transpose(1, 2), dim=2)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_maps("ickd", s, t)
        diff = self.gram(self.embed(s)) - self.gram(t)
        return diff.pow(2).sum() / (t.shape[1] * len(t))


def _fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """G[b, j, i] = mean over positions of top[b, j] · bottom[b, i], the larger map average-pooled first."""
    bottom, top = pool_to_smaller(bottom, top)
    b, t = bottom.float().flatten(2), top.float().flatten(2)
    return t @ b.transpose(1, 2) / b.shape[2]


@register_loss("fsp")
class FSP(nn.Module):
    """FSP, "A gift from knowledge distillation" (Yim et al., CVPR 2017), as RepDistiller runs it: the flow
    matrices G between consecutive maps of the list [stem, stage1, …, stageK] (taps `all_stages`), and the
    sum over pairs of the mean squared difference between the student's and the teacher's G. RepDistiller
    trains it only in its init stage (the student's layers but the classifier, 30 epochs) and sets it to 0
    afterwards: here the pre-stage (kd_lightning.engine.prestage, `only`), the term's weight scaling it. Each map
    must have as many channels in the student as in the teacher (RepDistiller refuses other pairs)."""

    shape_free = True

    def __init__(self, student_shape: tuple, teacher_shape: tuple, init_epochs: int = 30):
        super().__init__()
        lists = [
            isinstance(x, tuple) and x and isinstance(x[0], tuple) for x in (student_shape, teacher_shape)
        ]
        if not all(lists) or len(student_shape) < 2 or len(student_shape) != len(teacher_shape):
            raise ConfigError(
                "fsp reads a list of two or more feature maps on each side (student_tap: all_stages, teacher_tap: "
                f"all_stages), got student {student_shape} and teacher {teacher_shape}"
            )
        s_c, t_c = [s[0] for s in student_shape], [t[0] for t in teacher_shape]
        if s_c != t_c:
            differ = [
                f"{'stem' if i == 0 else f'stage{i}'}: {a} vs {b}"
                for i, (a, b) in enumerate(zip(s_c, t_c))
                if a != b
            ]
            raise ConfigError(
                f"fsp needs the same channels in the student's and the teacher's maps [stem, stage1, ...]: student "
                f"{s_c}, teacher {t_c} ({'; '.join(differ)}). Give the student the teacher's widths (student=cnn: "
                f"student.channels={t_c[1:]}), or a teacher of the student's (teachers.use=[...]); RepDistiller "
                "refuses such pairs too (a same-width pair: resnet56 → resnet20)"
            )
        self.init_epochs = as_int("fsp init_epochs", init_epochs, 1)

    @staticmethod
    def matrices(maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [_fsp_matrix(a, b) for a, b in zip(maps[:-1], maps[1:], strict=True)]

    def forward(self, s: list[torch.Tensor], t: list[torch.Tensor]) -> torch.Tensor:
        return add_all(
            (gs - gt).pow(2).mean() for gs, gt in zip(self.matrices(s), self.matrices(t), strict=True)
        )

    def pre_stage(self) -> PreStage:
        return PreStage(epochs=self.init_epochs, loss=self.forward, student=True, only=True)
