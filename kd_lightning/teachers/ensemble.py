"""TeacherEnsemble: frozen members (eval always, no gradients), forwarded without autograd."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.tensors import add_all

TapFeatures = dict[str, torch.Tensor]  # one model's features: {tap: tensor}
TeacherFeatures = dict[str, TapFeatures]  # every member's: {member: {tap: tensor}}


class TeacherEnsemble(nn.Module):
    """Frozen teachers. `forward(x)` returns `{member: {tap: tensor}}`, tensors usable as loss targets."""

    def __init__(
        self,
        members: Mapping[str, nn.Module],
        aliases: Mapping[str, Mapping[str, str]] | None = None,
        weights: Mapping[str, float] | None = None,
        checkpoints: Mapping[str, str] | None = None,
    ):
        super().__init__()
        if not members:
            raise ConfigError("a teacher ensemble needs at least one member")
        self.members = nn.ModuleDict(dict(members))
        self.aliases = {n: dict((aliases or {}).get(n, {})) for n in self.members}
        w = {n: float((weights or {}).get(n, 1.0)) for n in self.members}
        total = sum(w.values())
        if total <= 0 or any(v < 0 for v in w.values()):
            raise ConfigError(f"teacher weights must be non-negative and not all zero, got {w}")
        self.weights = {n: v / total for n, v in w.items()}
        self.checkpoints = dict(checkpoints or {})
        self.unfitted: list[str] = []  # dry_run: members that a real run would fit first (fresh weights here)
        self._taps: dict[str, FeatureTaps] = {}
        self.requires_grad_(False)
        super().train(False)
        self.configure_taps([])

    @property
    def names(self) -> list[str]:
        return list(self.members)

    @torch.no_grad()
    def fingerprint(self) -> torch.Tensor:
        """Per-teacher sum and sum of squares of all weights and buffers (float64): equal weights, equal print."""
        rows = []
        for name in self.names:
            tensors = [*self.members[name].parameters(), *self.members[name].buffers()]
            flat = [t.detach().double().flatten() for t in tensors if t.is_floating_point()]
            cat = torch.cat(flat) if flat else torch.zeros(1, dtype=torch.float64)
            rows.append(torch.stack([cat.sum(), cat.square().sum()]))
        return torch.stack(rows)

    def train(self, mode: bool = True) -> TeacherEnsemble:
        """Teachers stay in eval mode whatever the caller asks (Lightning calls .train() every epoch)."""
        return super().train(False)

    def configure_taps(self, taps: Iterable[str]) -> None:
        """Hook the features every member must return (the output is always returned as `logits`)."""
        for t in self._taps.values():
            t.remove()
        taps = sorted(set(taps))
        self._taps = {
            name: FeatureTaps(m, taps, aliases=self.aliases[name], owner=f"teacher {name!r}")
            for name, m in self.members.items()
        }

    def subset(self, names: Iterable[str]) -> TeacherEnsemble:
        """The members `names` as an ensemble of their own (the same modules, not copies; their weights
        normalised again over the subset), for jobs that train beside each other on one union of teachers."""
        chosen = list(names)
        unknown = [n for n in chosen if n not in self.members]
        if unknown:
            raise ConfigError(f"teachers {unknown} are not in this ensemble ({', '.join(self.names)})")
        part = TeacherEnsemble(
            {n: self.members[n] for n in chosen},
            {n: self.aliases[n] for n in chosen},
            {n: self.weights[n] for n in chosen},
            {n: self.checkpoints[n] for n in chosen if n in self.checkpoints},
        )
        part.unfitted = [n for n in self.unfitted if n in chosen]
        return part

    def tap_module(self, member: str, tap: str) -> str:
        """The module a member's tap reads (`fc:input`, `logits`, ...), after its aliases."""
        return self._taps[member].specs[tap]

    def forward(self, x: torch.Tensor, names: Iterable[str] | None = None) -> TeacherFeatures:
        """`{member: {tap: tensor}}` for every member, or for `names` only."""
        chosen = self._taps if names is None else {n: self._taps[n] for n in names}
        # no_grad, not inference_mode: an inference tensor cannot be saved for backward, so each output
        # would need a copy (one more kernel per tap and teacher in every live step) to serve as a target
        with torch.no_grad():
            return {name: taps(x) for name, taps in chosen.items()}

    def combined_logits(self, feats: Mapping[str, TapFeatures]) -> torch.Tensor:
        """Weighted mean of the members' logits (weights normalised to sum to one)."""
        return add_all(self.weights[n] * feats[n]["logits"].float() for n in self.members)
