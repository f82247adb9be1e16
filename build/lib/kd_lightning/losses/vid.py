"""VID, Variational Information Distillation (Ahn et al., CVPR 2019).

The student's (adapted) feature μ = r(s) is the mean of a Gaussian over the teacher's feature t with a
learned variance per teacher channel, σ²_c = softplus(α_c) + ε; the loss is the negative
log-likelihood per element, ½ · [(t − μ)² / σ²_c + log σ²_c], averaged (constant dropped). The
regressor r is the term's adapter (`adapter: mlp`, 1×1 convolutions for maps, as in the paper).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import as_float
from kd_lightning.losses.registry import register_loss


@register_loss("vid")
class VID(nn.Module):
    def __init__(self, teacher_shape: tuple[int, ...], init_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        self.eps = as_float("vid eps", eps, 0.0, open_low=True)
        init_var = as_float("vid init_var", init_var, self.eps, open_low=True)
        channels = teacher_shape[0]
        # softplus(α) + ε = init_var at the start
        self.alpha = nn.Parameter(torch.full((channels,), math.log(math.expm1(init_var - self.eps))))

    def variance(self) -> torch.Tensor:
        return F.softplus(self.alpha) + self.eps

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        var = self.variance().view(1, -1, *([1] * (t.dim() - 2)))
        return (0.5 * ((t.float() - s.float()).pow(2) / var + var.log())).mean()
