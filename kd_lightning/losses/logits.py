"""Logit methods beyond Hinton KD.

Decoupled KD (Zhao et al., CVPR 2022). With p = softmax(z / T), the target class t and b = [p_t, 1 − p_t]:
  TCKD = KL(b_T ‖ b_S),   NCKD = KL(p̂_T ‖ p̂_S), p̂ = softmax over the non-target classes only,
  DKD  = (α · TCKD + β · NCKD) · T², ramped in linearly over the first `warmup` epochs: factor
  min(e / warmup, 1) with e counted from 1, as mdistiller's trainer counts (its first epoch is 1/warmup).

DIST (Huang et al., NeurIPS 2022, "Knowledge distillation from a stronger teacher"). With
y = softmax(z / τ) and ρ the Pearson correlation:
  inter = 1 − mean_i ρ(y_S[i, :], y_T[i, :])   (per sample, over classes)
  intra = 1 − mean_c ρ(y_S[:, c], y_T[:, c])   (per class, over the batch)
  DIST  = τ² (β · inter + γ · intra); β = γ = τ = 1 as in the authors' code and torchdistill's DISTLoss.

Logit standardization (Sun et al., CVPR 2024): `standardize: true` on `kl` and `dkd` replaces each
sample's logits by their z-score, (z − mean) / (std + 1e-7) (std with Bessel's correction, as the
authors' code computes it), before the temperature: student and teacher then match in shape, not scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError, as_float, as_int
from kd_lightning.losses.registry import register_loss


def standardize_logits(z: torch.Tensor) -> torch.Tensor:
    """Each row's z-score (logit standardization, Sun et al. 2024)."""
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)


def same_logits(method: str, s: torch.Tensor, t: torch.Tensor) -> None:
    """Student and teacher logits of one shape: broadcasting (B, C) against (B, 1) would give a number
    that means nothing, without an error."""
    if s.shape != t.shape:
        raise ConfigError(
            f"{method} compares student logits of shape {tuple(s.shape)} with teacher outputs of shape "
            f"{tuple(t.shape)}: both must be (batch, classes); check the teacher's architecture and tap"
        )


def soft_logits(z: torch.Tensor, standardize: bool) -> torch.Tensor:
    """Logits as (B, C) float32, standardized when asked (before the temperature)."""
    z = z.flatten(1).float()
    return standardize_logits(z) if standardize else z


@register_loss("dkd")
class DKD(nn.Module):
    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup: int = 20,
        standardize: bool = False,
    ):
        super().__init__()
        self.alpha = as_float("dkd alpha", alpha, 0.0)
        self.beta = as_float("dkd beta", beta, 0.0)
        self.temperature = as_float("dkd temperature", temperature, 0.0, open_low=True)
        self.warmup = as_int("dkd warmup", warmup, 0)
        self.standardize = bool(standardize)

    def forward(self, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        same_logits("dkd", s, t)
        T = self.temperature
        zs, zt = soft_logits(s, self.standardize) / T, soft_logits(t, self.standardize) / T
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
        ramp = 1.0 if self.warmup == 0 else min(float(epoch + 1) / self.warmup, 1.0)  # epoch is 0-based here
        return ramp * (self.alpha * tckd + self.beta * nckd) * T * T


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register_loss("dist")
class DIST(nn.Module):
    """DIST: relations (Pearson correlation) between the student's and teacher's class probabilities,
    across classes for each sample (inter) and across the batch for each class (intra)."""

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.beta = as_float("dist beta", beta, 0.0)
        self.gamma = as_float("dist gamma", gamma, 0.0)
        self.temperature = as_float("dist temperature", temperature, 0.0, open_low=True)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        same_logits("dist", s, t)
        T = self.temperature
        ys, yt = (s.flatten(1).float() / T).softmax(1), (t.flatten(1).float() / T).softmax(1)
        inter = 1 - _pearson_rows(ys, yt).mean()
        intra = 1 - _pearson_rows(ys.T, yt.T).mean()
        return T * T * (self.beta * inter + self.gamma * intra)


def teachers_side_by_side(method: str, teacher_shape: tuple[int, ...], classes: int) -> int:
    """How many teachers' logits a `combine: concat` logit target holds (two or more, or a clear error)."""
    width = teacher_shape[0] if len(teacher_shape) == 1 else -1
    if width % classes != 0 or width // classes < 2:
        raise ConfigError(
            f"{method} needs the logits of two or more teachers side by side (combine: concat, teacher_tap: "
            f"logits), got teacher features of shape {tuple(teacher_shape)} for {classes} classes"
        )
    return width // classes


@register_loss("camkd")
class CAMKD(nn.Module):
    """Confidence-aware multi-teacher KD (Zhang, Chen & Wang, ICASSP 2022), its logit part.

    Used with `combine: concat` (the K teachers' logits side by side). Each sample's teacher weights
    come from the teachers' cross-entropy on its label, w_k = (1 − softmax over teachers of CE_k) / (K − 1),
    so a teacher that is more right weighs more, and the loss is Σ_k Σ_i w_{k,i} · T² KL(p_{T_k,i} ‖ p_{S,i}) / (B · K), the normalisation of the
    authors' code (a further 1/K beside the weights, which sum to 1). The members' `weight` is not
    used: the weights are the method's. The feature part of CA-MKD is not implemented."""

    shape_free = True  # the teachers' logits arrive concatenated: no adapter

    def __init__(self, teacher_shape: tuple[int, ...], num_classes: int, temperature: float = 4.0):
        super().__init__()
        self.temperature = as_float("camkd temperature", temperature, 0.0, open_low=True)
        self.classes = as_int("camkd num_classes", num_classes, 2)
        self.k = teachers_side_by_side("camkd", teacher_shape, self.classes)

    def forward(self, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        T, k = self.temperature, self.k
        zs = s.flatten(1).float()
        zt = t.flatten(1).float().view(len(zs), k, self.classes)  # (B, K, C)
        ce = F.cross_entropy(zt.reshape(-1, self.classes), y.repeat_interleave(k), reduction="none")
        weights = (1.0 - ce.view(-1, k).softmax(1)) / (k - 1)  # (B, K), no gradient (teachers are constants)
        log_ps = F.log_softmax(zs / T, 1).unsqueeze(1)  # (B, 1, C)
        log_pt = F.log_softmax(zt / T, 2)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(2) * T * T  # (B, K)
        return (weights * kl).sum() / (len(zs) * k)


def aekd_weights(grads: torch.Tensor, tolerance: float) -> torch.Tensor:
    """AE-KD's teacher weights from the teachers' gradient vectors `grads` (K, D): the α on the simplex
    with every α_k ≤ `tolerance` that minimises ‖Σ_k α_k g_k‖², i.e. the dual of a one-class SVM with the
    precomputed kernel G = g gᵀ and ν = 1 / (tolerance · K), solved with scikit-learn's libsvm as the
    authors' code does (helper/optimization.py, its default without normalisation). Hand-written around
    the solver: no library here offers this min-norm point."""
    from sklearn.svm import OneClassSVM

    k = grads.shape[0]
    nu = min(max(1.0 / (tolerance * k), 1.0 / k), 1.0)  # the authors' clamp to [1/K, 1]
    gram = (grads @ grads.T).double().cpu().numpy()
    svm = OneClassSVM(kernel="precomputed", nu=nu, tol=1e-6).fit(gram)
    alpha = torch.zeros(k, dtype=torch.float64)
    alpha[torch.as_tensor(svm.support_)] = torch.as_tensor(svm.dual_coef_[0]) / (k * nu)
    return alpha.float()


@register_loss("aekd")
class AEKD(nn.Module):
    """Adaptive ensemble KD in gradient space (Du et al., NeurIPS 2020, "Agree to disagree"), its logit part.

    Used with `combine: concat` (the K teachers' logits side by side). Per teacher, Hinton's
    KL_k = T² · KL(p_{T_k} ‖ p_S) summed over classes and averaged over the batch. Each step the teachers'
    gradients with respect to the student's logits, g_k = T (p_S − p_{T_k}) / B, are averaged over the
    batch (a C-vector per teacher) and weighted by `aekd_weights` (tolerance C = 0.6, the authors'
    default -C; no normalisation, their default). The loss is Σ_k α_k KL_k with α held constant.
    The members' `weight` is not used: the weights are the method's. Under DDP each rank weighs its own
    batch, as the authors' code does. The feature (hint) part of AE-KD is not implemented."""

    shape_free = True  # the teachers' logits arrive concatenated: no adapter

    def __init__(
        self,
        teacher_shape: tuple[int, ...],
        num_classes: int,
        temperature: float = 4.0,
        tolerance: float = 0.6,
    ):
        super().__init__()
        self.temperature = as_float("aekd temperature", temperature, 0.0, open_low=True)
        self.tolerance = as_float("aekd tolerance", tolerance, 0.0, open_low=True)
        self.classes = as_int("aekd num_classes", num_classes, 2)
        self.k = teachers_side_by_side("aekd", teacher_shape, self.classes)
        self.last_weights = torch.full((self.k,), 1.0 / self.k)  # the latest step's α, for inspection

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        T, k = self.temperature, self.k
        zs = s.flatten(1).float()
        zt = t.flatten(1).float().view(len(zs), k, self.classes)  # (B, K, C)
        log_ps = F.log_softmax(zs / T, 1)
        log_pt = F.log_softmax(zt / T, 2)
        kl = (log_pt.exp() * (log_pt - log_ps.unsqueeze(1))).sum(2).mean(0) * T * T  # (K,)
        with torch.no_grad():  # ∂KL_k/∂z_S in closed form, averaged over the batch: (K, C)
            grads = (T * (log_ps.exp().unsqueeze(1) - log_pt.exp())).mean(0) / len(zs)
            alpha = aekd_weights(grads, self.tolerance).to(kl.device)
        self.last_weights = alpha.detach().cpu()
        return (alpha * kl).sum()
