"""CRD, Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020).

Both sides are embedded (linear heads, L2-normalised, `feat_dim`); a memory bank per side holds an
embedding for every training sample, updated with momentum. For each sample its other-side embedding
is the positive and `nce_k` bank entries drawn uniformly are the negatives; with
h = exp(v_a · v_b / τ) / Z (Z estimated once, on the first batch, as mean(h) · N) the NCE loss is
  −log[h⁺ / (h⁺ + K/N)] − Σ_negatives log[(K/N) / (h⁻ + K/N)],
summed over both directions (student anchor vs teacher bank, teacher anchor vs student bank) and
averaged over the batch. Needs the sample index of each batch element (kd_lightning batches carry it).

Under DDP every rank applies the bank updates of every rank (gathered: index and both embeddings), so
all ranks end each step with the same banks, equal to one process updating them with the global batch;
Z is estimated from the mean over ranks. (DDP broadcasts rank 0's buffers at each forward: without the
gather, the other ranks' updates were overwritten and lost.)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError, as_float, as_int
from kd_lightning.losses.registry import register_loss


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x`, concatenated in rank order. The ranks' batches are of one size (the
    DDP samplers give every rank as many samples, in batches of one size), so no size is read on the host;
    a rank whose rows differ in count stops torch.distributed with an error. Hand-written: this runs inside
    a loss module (no LightningModule.all_gather here)."""
    out = torch.empty((_world() * len(x), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


@register_loss("crd")
class CRD(nn.Module):
    shape_free = True
    # buffers (register_buffer), declared for the type checker
    memory_s: torch.Tensor
    memory_t: torch.Tensor
    z_s: torch.Tensor
    z_t: torch.Tensor
    full_bank_ratio = 32  # score the whole bank when N <= ratio · (K + 1)

    def __init__(
        self,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...],
        num_samples: int,
        feat_dim: int = 128,
        nce_k: int = 4096,
        nce_t: float = 0.07,
        momentum: float = 0.5,
    ):
        super().__init__()
        self.n = as_int("crd num_samples", num_samples, 2)
        self.feat_dim = as_int("crd feat_dim", feat_dim, 1)
        self.k = min(as_int("crd nce_k", nce_k, 1), self.n - 1)
        self.tau = as_float("crd nce_t", nce_t, 0.0, open_low=True)
        self.momentum = as_float("crd momentum", momentum, 0.0, 1.0)
        self.embed_s = nn.Linear(_numel(student_shape), self.feat_dim)
        self.embed_t = nn.Linear(_numel(teacher_shape), self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(self.n, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(self.n, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._z_known = False  # set after the first batch: z_s and z_t hold their estimates from then on

    def draw_negatives(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) indices drawn uniformly from the bank (the sample itself may be drawn, as in the paper)."""
        return torch.randint(0, self.n, (len(index), self.k), device=index.device)

    def _nce(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, 1 + K), column 0 the positive; the NCE loss averaged over the batch."""
        noise = self.k / self.n
        log_pos = (h[:, 0] / (h[:, 0] + noise)).log()
        log_neg = (noise / (h[:, 1:] + noise)).log()
        return -(log_pos.sum() + log_neg.sum()) / len(h)

    def _scores(
        self, anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        if self.n <= self.full_bank_ratio * idx.shape[1]:
            # scoring the whole bank in one matmul and picking the drawn columns beats gathering
            # (B, K+1, d) rows unless the bank is much larger than the negatives (memory-bound gather)
            scores = torch.gather(anchor @ bank.detach().T, 1, idx)
        else:
            scores = torch.bmm(bank[idx].detach(), anchor.unsqueeze(2)).squeeze(2)
        h = torch.exp(scores / self.tau)
        # the normalising constant, estimated once from every rank's first batch (a resumed run has it from
        # its checkpoint): the one value read on the host, at the first step only
        if not self._z_known and z.item() < 0:
            mean = h.mean().detach().clone()
            if _world() > 1:
                dist.all_reduce(mean)
                mean /= _world()
            z.copy_(mean * self.n)
        return h / z

    def forward(self, s: torch.Tensor, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if index is None:
            raise ConfigError("crd needs each sample's index in the batch: (x, y, index) batches")
        if not self._z_known and int(index.max()) >= self.n:  # checked on the first batch only
            raise ConfigError(
                f"crd got sample index {int(index.max())} but its memory holds {self.n} samples"
            )
        vs = F.normalize(self.embed_s(s.flatten(1).float()), dim=1)
        vt = F.normalize(self.embed_t(t.flatten(1).float()), dim=1)
        idx = torch.cat([index.view(-1, 1), self.draw_negatives(index)], 1)
        loss = self._nce(self._scores(vs, self.memory_t, idx, self.z_s)) + self._nce(
            self._scores(vt, self.memory_s, idx, self.z_t)
        )
        self._z_known = True
        if self.training:
            with torch.no_grad():
                if _world() > 1:  # every rank applies every rank's updates: identical banks
                    index, vs, vt = (_gather_rows(a.detach()) for a in (index, vs, vt))
                for name, v in (("memory_s", vs), ("memory_t", vt)):
                    bank = getattr(self, name)
                    mixed = F.normalize(bank[index] * self.momentum + v.detach() * (1 - self.momentum), dim=1)
                    if self.n <= self.full_bank_ratio * idx.shape[1]:
                        # the whole bank was saved for backward: update a copy (small banks only)
                        setattr(self, name, bank.index_copy(0, index, mixed))
                    else:
                        bank[index] = mixed
        return loss
