"""Distances between a (adapted) student feature and a teacher target of the same shape.

Each returns a scalar averaged over the batch. Reductions follow the usual definitions:
mse/l1/smooth_l1 average over every element; cosine is 1 − cos over the flattened feature;
kl is KL(softmax(t/T) ‖ softmax(s/T)) · T² per sample (Hinton et al. 2015); soft_mse regresses the
student's raw outputs onto the teacher's probabilities softmax(t/T) (least-squares soft labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.logits import same_logits, soft_logits
from kd_lightning.losses.registry import register_loss


def _per_sample(elementwise: torch.Tensor) -> torch.Tensor:
    return elementwise.flatten(1).mean(1)


@register_loss("mse")
class MSE(nn.Module):
    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(s, t)

    def per_sample(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One value per sample whose batch mean is `forward` (combine: gate weighs them per sample)."""
        return _per_sample(F.mse_loss(s, t, reduction="none"))


@register_loss("l1")
class L1(nn.Module):
    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(s, t)

    def per_sample(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _per_sample(F.l1_loss(s, t, reduction="none"))


@register_loss("smooth_l1")
class SmoothL1(nn.Module):
    def __init__(self, beta: float = 1.0):
        super().__init__()
        if beta <= 0:
            raise ConfigError(f"smooth_l1 beta must be positive, got {beta}")
        self.beta = float(beta)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(s, t, beta=self.beta)

    def per_sample(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _per_sample(F.smooth_l1_loss(s, t, beta=self.beta, reduction="none"))


@register_loss("cosine")
class Cosine(nn.Module):
    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.per_sample(s, t).mean()

    def per_sample(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - F.cosine_similarity(s.flatten(1).float(), t.flatten(1).float(), dim=1, eps=1e-8)


@register_loss("kl", "kd")
class KL(nn.Module):
    """Hinton KD when applied to logits; computed in fp32 under mixed precision."""

    def __init__(self, temperature: float = 4.0, standardize: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"kl temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.standardize = bool(standardize)  # logit standardization (kd_lightning.losses.logits)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the mean of `per_sample`, with kl_div's own reduction (fewer kernels in every step)
        log_p_s, log_p_t = self._log_probs(s, t)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (self.temperature**2)

    def per_sample(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_p_s, log_p_t = self._log_probs(s, t)
        return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1) * (self.temperature**2)

    def _log_probs(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        same_logits("kl", s, t)
        T = self.temperature
        log_p_s = F.log_softmax(soft_logits(s, self.standardize) / T, dim=1)
        log_p_t = F.log_softmax(soft_logits(t, self.standardize) / T, dim=1)
        return log_p_s, log_p_t


@register_loss("soft_mse")
class SoftMSE(nn.Module):
    """Squared error between student outputs and teacher probabilities: the kernel-regime KD of Rahbar et al."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"soft_mse temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        same_logits("soft_mse", s, t)
        return F.mse_loss(s.float(), F.softmax(t.float() / self.temperature, dim=-1))
