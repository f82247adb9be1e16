"""SRD, "Understanding the role of the projector in knowledge distillation" (Miles & Mikolajczyk, AAAI 2024),
its representation term as the authors' code computes it (Simple-Recipe-Distillation, imagenet
`OurDistillationLoss`; torchdistill's SRDLoss is the same):

  f_S = BN(W z_S + b),  f_T = BN(z_T),  loss = log Σ_{i,d} |f_S − f_T|^p   (p = 4)

z the spatially averaged last feature map (our `embed` of a CNN; a map is averaged here), W a linear
projector trained with the student, BN a batch norm without affine parameters (eps 1e-4) on each side,
with batch statistics in training. The authors weigh it by 2 and add KL(p_T ‖ p_S) on the logits at
T = 1 and the cross-entropy: conf/distill/srd.yaml composes those three terms.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.errors import ConfigError, as_float
from kd_lightning.losses.registry import register_loss


def _pooled(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(2).mean(2) if x.dim() > 2 else x.float()


@register_loss("srd")
class SRD(nn.Module):
    shape_free = True  # owns its projector

    def __init__(
        self,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...],
        exponent: float = 4.0,
        eps: float = 1e-4,
    ):
        super().__init__()
        if not student_shape or not teacher_shape:
            raise ConfigError(f"srd needs features, got student {student_shape} and teacher {teacher_shape}")
        self.exponent = as_float("srd exponent", exponent, 0.0, open_low=True)
        eps = as_float("srd eps", eps, 0.0, open_low=True)
        self.embed = nn.Linear(student_shape[0], teacher_shape[0])
        self.bn_s = nn.BatchNorm1d(teacher_shape[0], eps=eps, affine=False)
        self.bn_t = nn.BatchNorm1d(teacher_shape[0], eps=eps, affine=False)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        diff = self.bn_s(self.embed(_pooled(s))) - self.bn_t(_pooled(t))
        return torch.log(diff.abs().pow(self.exponent).sum())
