"""StepTally: what the training steps report (loss, its parts, correct predictions), kept on the device.

A value read on the host inside a step (`float(loss)`, `if torch.isfinite(loss)`, a metric's `.item()`)
makes the CPU wait for the GPU to finish everything queued so far: the next step's kernels cannot be
queued while the GPU works, and a small model then runs at a fraction of its speed. So each step only
stacks its values into one small device tensor (one kernel), and `read` brings the steps tallied since
the last read to the host in one copy, at points where the run reads values anyway (a logging step,
before validation, before a checkpoint, the epoch's end). There the loss is checked: a non-finite loss
stops the run naming the step it first appeared in and its parts, as a check in every step would.

Hand-written rather than torchmetrics: a torchmetrics metric updates its state with several kernels per
step, and Lightning's `self.log(..., on_step=True)` of a tensor is read on the host after every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

Reduce = Callable[..., torch.Tensor]  # Strategy.reduce(tensor, reduce_op=...): the sum over the ranks


class StepTally:
    def __init__(self) -> None:
        self.names: list[str] = []
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # (global step, batch size, row)
        self.last_loss = math.nan
        self.start_epoch()

    def start_epoch(self) -> None:
        self._pending = []
        self._sums: list[float] = []
        self._count = 0

    def add(
        self,
        step: int,
        n: int,
        loss: torch.Tensor,
        parts: Mapping[str, torch.Tensor],
        logits: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        """One step's values, as one row on the device: [loss, correct predictions, *parts]."""
        names = ["loss", "acc", *parts]
        if names != self.names:
            self._drain_names(names)
        correct = (logits.detach().argmax(1) == y).sum()
        row = torch.stack(
            [loss.detach().float(), correct.float(), *(v.detach().float() for v in parts.values())]
        )
        self._pending.append((step, n, row))

    def _drain_names(self, names: list[str]) -> None:
        if self._pending:
            raise RuntimeError(f"the loss parts changed within an epoch: {self.names} -> {names}")
        self.names, self._sums = names, []

    def read(self, epoch: int, reduce: Reduce | None = None) -> None:
        """Bring the pending rows to the host; raise FloatingPointError at the first non-finite loss on any
        rank (`reduce`: the strategy's sum over the ranks, so that every rank stops at the same read)."""
        if not self._pending:
            return
        rows = torch.stack([r for _, _, r in self._pending])
        bad = ~torch.isfinite(rows).all(1)
        flag = bad.any().to(rows.dtype).reshape(1)
        anywhere = reduce(flag, reduce_op="sum") if reduce is not None else flag
        host = torch.cat([anywhere.to(rows.device), bad.to(rows.dtype), rows.flatten()]).cpu()  # the one read
        pending, self._pending = self._pending, []
        k = len(pending)
        stopped, bad_rows, values = bool(host[0] > 0), host[1 : 1 + k], host[1 + k :].double().view(k, -1)
        if stopped:
            raise FloatingPointError(self._message(epoch, pending, bad_rows, values))
        if not self._sums:
            self._sums = [0.0] * values.shape[1]
        for (_, n, _), row in zip(pending, values.tolist(), strict=True):
            self._sums = [
                s + (v if i == 1 else v * n) for i, (s, v) in enumerate(zip(self._sums, row, strict=True))
            ]
            self._count += n
        self.last_loss = float(values[-1, 0])

    def _message(
        self,
        epoch: int,
        pending: list[tuple[int, int, torch.Tensor]],
        bad: torch.Tensor,
        values: torch.Tensor,
    ) -> str:
        where = [i for i, b in enumerate(bad.tolist()) if b]
        if not where:
            first_step = pending[0][0]
            return (
                f"non-finite training loss on another rank at epoch {epoch}, between steps {first_step} and "
                f"{pending[-1][0]}. Lower optim.lr or the term weights"
            )
        i = where[0]
        row = values[i].tolist()
        parts = {name: v for j, (name, v) in enumerate(zip(self.names, row, strict=True)) if j > 1}
        return (
            f"non-finite training loss ({row[0]}) at epoch {epoch}, step {pending[i][0]}: parts {parts}. "
            "Lower optim.lr or the term weights"
        )

    def epoch_means(self, reduce: Reduce | None = None) -> dict[str, float]:
        """The epoch's mean loss, parts and accuracy over every sample of every rank."""
        if not self._count:
            return {}
        totals = torch.tensor([self._count, *self._sums], dtype=torch.float64)
        if reduce is not None:
            device = _reduce_device(reduce)
            exact = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            totals = reduce(totals.to(device, exact), reduce_op="sum").cpu().double()
        count, *sums = totals.tolist()
        return {name: s / max(1.0, count) for name, s in zip(self.names, sums, strict=True)}


def _reduce_device(reduce: Reduce) -> torch.device:
    """Where the strategy's collectives expect their tensors (its root device)."""
    strategy = getattr(reduce, "__self__", None)
    return strategy.root_device if strategy is not None else torch.device("cpu")


def log_every(trainer: object) -> int:
    """The trainer's `log_every_n_steps` (at least 1): the steps at which the tally is read. Lightning sets the
    attribute on the Trainer in its logger connector, so the Trainer class does not declare it."""
    return max(1, int(getattr(trainer, "log_every_n_steps", 50)))
