"""Factor Transfer (Kim, Park & Kwak, NeurIPS 2018, "Paraphrasing complex network"), as RepDistiller runs it.

- A *paraphraser* (an autoencoder of the teacher's last feature map: three 3×3 convolutions down to
  k · C_T channels, three 3×3 transposed convolutions back, LeakyReLU 0.1, no batch norm) is trained
  first, alone, to reconstruct the teacher's map (MSE; the pre-stage, `init_epochs`, RepDistiller's 30).
  Then it is frozen: its encoder's output is the teacher's *factor*.
- A *translator* (three 3×3 convolutions with batch norm, from the student's channels to k · C_T) trains
  with the student; its output is the student's factor.
- The loss: with F(f) = normalize(mean over channels of f^p1), flattened per sample, the mean of
  |F(f_S) − F(f_T)|^p2 (p1 = 2, p2 = 1), the larger map average-pooled to the smaller's size first.
Maps may be 2-D (B, C, H, W) or 1-D (B, C, L): the same layers in one dimension fewer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError, as_float, as_int
from kd_lightning.losses.maps import pool_to_smaller
from kd_lightning.losses.protocol import PreStage
from kd_lightning.losses.registry import register_loss


def _layers(dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    if dims == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d
    return nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d


def _three(conv: type[nn.Module], bn: type[nn.Module] | None, c_in: int, c_out: int) -> nn.Sequential:
    """conv(c_in → c_in), conv(c_in → c_out), conv(c_out → c_out), each 3 × 3 (+ BN) + LeakyReLU 0.1."""
    layers: list[nn.Module] = []
    for a, b in ((c_in, c_in), (c_in, c_out), (c_out, c_out)):
        layers += [conv(a, b, 3, 1, 1), *([bn(b)] if bn else []), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    def __init__(self, channels: int, factor_channels: int, dims: int):
        super().__init__()
        conv, deconv, _ = _layers(dims)
        self.encoder = _three(conv, None, channels, factor_channels)
        dec: list[nn.Module] = []
        for a, b in ((factor_channels, factor_channels), (factor_channels, channels), (channels, channels)):
            dec += [deconv(a, b, 3, 1, 1), nn.LeakyReLU(0.1)]
        self.decoder = nn.Sequential(*dec)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(t))


@register_loss("ft")
class FactorTransfer(nn.Module):
    shape_free = True  # the translator maps the student's channels; no adapter

    def __init__(
        self,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...],
        k: float = 0.5,
        p1: float = 2.0,
        p2: int = 1,
        init_epochs: int = 30,
    ):
        super().__init__()
        if len(student_shape) not in (2, 3) or len(teacher_shape) != len(student_shape):
            raise ConfigError(
                f"ft needs feature maps on both sides ((C, L) or (C, H, W)), got student {tuple(student_shape)} "
                f"and teacher {tuple(teacher_shape)}; tap a convolutional layer (student_tap=map, teacher_tap=map)"
            )
        self.k = as_float("ft k", k, 0.0, open_low=True)
        self.p1 = as_float("ft p1", p1, 0.0, open_low=True)
        self.p2 = as_int("ft p2", p2, 1)
        self.init_epochs = as_int("ft init_epochs", init_epochs, 1)
        dims = len(teacher_shape) - 1
        factor_channels = max(1, int(teacher_shape[0] * self.k))
        conv, _, bn = _layers(dims)
        self.translator = _three(conv, bn, student_shape[0], factor_channels)
        # trained in the pre-stage only, frozen afterwards (not in the main optimiser: RepDistiller's
        # paraphraser is in module_list but not in trainable_list)
        self.paraphraser = Paraphraser(teacher_shape[0], factor_channels, dims).requires_grad_(False)

    def factor(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.float().pow(self.p1).mean(1).flatten(1))

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        factor_s = self.translator(s)
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(t)
        a, b = pool_to_smaller(factor_s, factor_t)
        diff = self.factor(a) - self.factor(b)
        return diff.abs().mean() if self.p2 == 1 else diff.pow(self.p2).mean()

    def pre_stage(self) -> PreStage:
        """The paraphraser learns to reconstruct the teacher's map (MSE), before distillation starts."""
        return PreStage(
            epochs=self.init_epochs,
            module=self.paraphraser,
            loss=lambda s, t: F.mse_loss(self.paraphraser(t.float()), t.float()),
        )
