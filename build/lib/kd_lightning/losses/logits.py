"""Logit methods beyond Hinton KD: Decoupled KD (Zhao et al., CVPR 2022).

With p = softmax(z / T), the target class t and b = [p_t, 1 − p_t]:
  TCKD = KL(b_T ‖ b_S),   NCKD = KL(p̂_T ‖ p̂_S), p̂ = softmax over the non-target classes only,
  DKD  = (α · TCKD + β · NCKD) · T², ramped in linearly over the first `warmup` epochs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import as_float, as_int
from kd_lightning.losses.registry import register_loss


@register_loss("dkd")
class DKD(nn.Module):
    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: int = 20):
        super().__init__()
        self.alpha = as_float("dkd alpha", alpha, 0.0)
        self.beta = as_float("dkd beta", beta, 0.0)
        self.temperature = as_float("dkd temperature", temperature, 0.0, open_low=True)
        self.warmup = as_int("dkd warmup", warmup, 0)

    def forward(self, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        T = self.temperature
        zs, zt = s.flatten(1).float() / T, t.flatten(1).float() / T
        target = F.one_hot(y, zs.shape[1]).bool()
        ps, pt = zs.softmax(1), zt.softmax(1)
        # binary (target, rest) distributions
        bs = torch.stack([ps[target], 1 - ps[target]], 1).clamp_min(1e-12)
        bt = torch.stack([pt[target], 1 - pt[target]], 1).clamp_min(1e-12)
        tckd = (bt * (bt.log() - bs.log())).sum(1).mean()
        # non-target distributions: the target logit removed (−inf before the softmax)
        log_qs = zs.masked_fill(target, float("-inf")).log_softmax(1)
        log_qt = zt.masked_fill(target, float("-inf")).log_softmax(1)
        qt = log_qt.exp()
        nckd = (qt * (log_qt - log_qs)).masked_fill(target, 0.0).sum(1).mean()
        ramp = 1.0 if self.warmup == 0 else min(float(epoch) / self.warmup, 1.0)
        return ramp * (self.alpha * tckd + self.beta * nckd) * T * T
