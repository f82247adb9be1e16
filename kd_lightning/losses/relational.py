"""Relational methods: they compare how a batch's samples relate to one another, so the student's and
the teachers' features may have different sizes (no adapter needed; `shape_free`).

- SP, Similarity-Preserving (Tung & Mori, ICCV 2019): G = Q Qᵀ of the flattened batch features,
  rows L2-normalised; L = ‖G̃_T − G̃_S‖²_F / b².
- RKD, Relational KD (Park et al., CVPR 2019): distance term — Huber loss between pairwise distances
  (i ≠ j) each divided by its batch mean; angle term — Huber loss between the cosines of the angles
  ∠(t_i − t_j, t_k − t_j) over triplets of distinct samples; both averaged. L = w_d · L_D + w_a · L_A.
- PKT, Probabilistic KT (Passalis & Tefas, ECCV 2018): cosine kernel K = (cos + 1) / 2.
  `mode: code` (default; RepDistiller's and torchdistill's computation, which the default weight 30000
  comes from): rows normalised to sum 1 with the diagonal kept, L = mean over all b² entries of
  p^T log((p^T + ε) / (p^S + ε)), features divided by (‖x‖ + ε). `mode: paper`: conditional
  probabilities p_{i|j} = K_ij / Σ_{k≠j} K_kj (i ≠ j), L = Σ_j Σ_{i≠j} p^T_{i|j} log(p^T_{i|j} / p^S_{i|j})
  averaged over the batch: about b times larger than `code` for a batch of b, so scale its weight.
- CC, Correlation Congruence (Peng et al., ICCV 2019). `mode: code` (default; RepDistiller's `Correlation`,
  the authors' code as RepDistiller received it, which its weight 0.02 belongs to): student and teacher
  features each go through a trainable linear embedding to `feat_dim` (128), Δ = |e_S − e_T|, and
  L = mean over i < b of Σ_d Δ_{i,d} Δ_{i+1,d} (consecutive samples of the batch). `mode: paper`:
  correlation matrices of L2-normalised features under a Gaussian RBF kernel exp(−γ‖x − y‖²), expanded to
  order P in Taylor series; L = ‖C_T − C_S‖²_F / b² (no parameters; a different scale: tune its weight).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError, as_float, as_int
from kd_lightning.losses.registry import register_loss
from kd_lightning.tensors import add_all


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).float()


@register_loss("sp")
class SimilarityPreserving(nn.Module):
    shape_free = True

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = s.shape[0]
        gs = F.normalize(_flat(s) @ _flat(s).T, dim=1)
        gt = F.normalize(_flat(t) @ _flat(t).T, dim=1)
        return (gt - gs).pow(2).sum() / (b * b)


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(1e-12)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(x), device=x.device, dtype=x.dtype))


def _angles(x: torch.Tensor) -> torch.Tensor:
    """cos ∠(x_i − x_j, x_k − x_j) for all (i, j, k): shape (b, b, b) indexed [j, i, k]."""
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)  # e[j, i] = unit(x_i − x_j)
    return torch.bmm(e, e.transpose(1, 2))


@register_loss("rkd")
class RKD(nn.Module):
    shape_free = True

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0):
        super().__init__()
        self.distance_weight = as_float("rkd distance_weight", distance_weight, 0.0)
        self.angle_weight = as_float("rkd angle_weight", angle_weight, 0.0)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = _flat(s), _flat(t)
        b = len(s)
        if b < 2:
            return s.new_zeros(())
        off = ~torch.eye(b, dtype=torch.bool, device=s.device)
        ds, dt = _pairwise_distances(s), _pairwise_distances(t)
        ds = ds / ds[off].mean()
        dt = dt / dt[off].mean()
        loss_d = F.smooth_l1_loss(ds[off], dt[off])
        if b >= 3:  # distinct triplets only, as in the paper (X³ = triplets of distinct samples)
            eye = torch.eye(b, dtype=torch.bool, device=s.device)
            distinct = ~(eye[:, :, None] | eye[:, None, :] | eye[None, :, :])  # [j, i, k]: i≠j, k≠j, i≠k
            # a masked mean, not F.smooth_l1_loss(a[distinct], b[distinct]): the same value and gradient,
            # without gathering b³ entries twice and scattering them back (4× faster per step at b = 128)
            huber = F.smooth_l1_loss(_angles(s), _angles(t), reduction="none")
            loss_a = (huber * distinct).sum() / distinct.sum()
        else:
            loss_a = s.new_zeros(())
        return self.distance_weight * loss_d + self.angle_weight * loss_a


@register_loss("pkt")
class PKT(nn.Module):
    shape_free = True

    def __init__(self, eps: float = 1e-7, mode: str = "code"):
        super().__init__()
        self.eps = as_float("pkt eps", eps, 0.0, open_low=True)
        if mode not in ("code", "paper"):
            raise ConfigError(f"pkt mode={mode!r}; valid: code (RepDistiller, torchdistill), paper")
        self.mode = mode

    def _rows_code(self, x: torch.Tensor) -> torch.Tensor:
        x = _flat(x)
        x = torch.nan_to_num(x / (x.norm(dim=1, keepdim=True) + self.eps))
        k = (x @ x.T + 1) / 2
        return k / k.sum(1, keepdim=True)

    def _conditional(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(_flat(x), dim=1)
        k = (x @ x.T + 1) / 2
        k = k * (1 - torch.eye(len(x), device=x.device, dtype=x.dtype))  # i ≠ j
        return k / k.sum(0, keepdim=True).clamp_min(self.eps)  # column j: p_{i|j}

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.mode == "code":
            ps, pt = self._rows_code(s), self._rows_code(t)
            return (pt * ((pt + self.eps) / (ps + self.eps)).log()).mean()
        ps, pt = self._conditional(s), self._conditional(t)
        off = ~torch.eye(len(ps), dtype=torch.bool, device=ps.device)
        kl = pt * ((pt + self.eps).log() - (ps + self.eps).log())
        return kl[off].sum() / len(ps)


@register_loss("cc")
class CorrelationCongruence(nn.Module):
    shape_free = True
    MODES = ("code", "paper")

    def __init__(
        self,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...],
        mode: str = "code",
        feat_dim: int | None = None,
        gamma: float | None = None,
        order: int | None = None,
    ):
        super().__init__()
        if mode not in self.MODES:
            raise ConfigError(f"cc mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.mode = mode
        own, other = (
            (("feat_dim",), ("gamma", "order")) if mode == "code" else (("gamma", "order"), ("feat_dim",))
        )
        given = {"feat_dim": feat_dim, "gamma": gamma, "order": order}
        stray = [k for k in other if given[k] is not None]
        if stray:
            raise ConfigError(f"cc {stray[0]} belongs to mode={'paper' if mode == 'code' else 'code'}; "
                              f"mode={mode} takes {', '.join(own)}")  # fmt: skip
        if mode == "code":
            dim = as_int("cc feat_dim", 128 if feat_dim is None else feat_dim, 1)
            self.embed_s = nn.Linear(math.prod(student_shape), dim)
            self.embed_t = nn.Linear(math.prod(teacher_shape), dim)
            return
        self.gamma = as_float("cc gamma", 0.4 if gamma is None else gamma, 0.0, open_low=True)
        self.order = as_int("cc order", 2 if order is None else order, 0)
        if self.order > 20:
            raise ConfigError(f"cc order must be <= 20, got {self.order}")

    def _correlation(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(_flat(x), dim=1)
        sim = x @ x.T  # for unit vectors ‖x − y‖² = 2 − 2 xᵀy, so exp(−γ‖x−y‖²) = e^{−2γ} e^{2γ xᵀy}
        return math.exp(-2 * self.gamma) * add_all(
            (2 * self.gamma) ** p / math.factorial(p) * sim.pow(p) for p in range(self.order + 1)
        )

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.mode == "code":
            delta = (self.embed_s(_flat(s)) - self.embed_t(_flat(t))).abs()
            return (delta[:-1] * delta[1:]).sum(1).mean()
        b = s.shape[0]
        return (self._correlation(t) - self._correlation(s)).pow(2).sum() / (b * b)
