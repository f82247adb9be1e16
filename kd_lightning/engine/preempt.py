"""A job that SLURM warns before its time limit or a preemption saves a checkpoint mid-epoch, then requeues.

submitit's sbatch scripts ask SLURM for SIGUSR2 `signal_delay_s` seconds before the end
(`#SBATCH --signal=USR2@120`) and requeue the job in their own SIGUSR2 handler; Lightning's requeue
listens on SIGUSR1 and leaves a signal that already has a handler alone. So nothing saved the training
state, and the requeued job went back to the last end-of-epoch checkpoint (hours on ImageNet). Here the
signal only marks the run; at the next step boundary (every rank at the same step: under DDP the ranks
agree every `trainer.log_every_n_steps` steps) the state is saved as `checkpoints/last.ckpt` (the loaders
record how far into the epoch they got: kd_lightning.data.base.ResumableLoader, DeviceBatches), then the
handler that was there before runs (submitit's: requeue and exit); without one the run stops as
interrupted, with the command that continues it. The requeued run resumes from that checkpoint
(resume=auto, or SLURM_RESTART_COUNT), with the batch it would have trained next.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch

from kd_lightning.core.tally import log_every
from kd_lightning.engine.resume import RunInterrupted


class PreemptionCheckpoint(pl.Callback):
    def __init__(self, folder: Path, signum: int = signal.SIGUSR2):
        self.folder, self.signum = folder, signum
        self.received: int | None = None
        self.previous: Any = None
        self.saved: Path | None = None

    def _mark(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self._frame = frame

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self.previous = signal.signal(self.signum, self._mark)
        except ValueError:  # not the main thread: the signal is not ours to take
            self.previous = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        if self.previous is not None:
            signal.signal(self.signum, self.previous)
            self.previous = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if not self._agreed(trainer):
            return
        # the previous batch is done (optimiser step included) and this one is not started: the checkpoint
        # holds a whole number of batches, and a resumed run starts with this one
        path = self.folder / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        self.saved = path
        signum = self.received or self.signum
        previous, self.previous = self.previous, None
        signal.signal(self.signum, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):  # submitit's handler: requeue this job, and exit
            previous(signum, getattr(self, "_frame", None))
        name = signal.Signals(signum).name
        raise RunInterrupted(signum, f"{name} (the job is ending; a checkpoint was saved mid-epoch: {path})")

    def _agreed(self, trainer: pl.Trainer) -> bool:
        """Whether this step saves: one process as soon as it is signalled; under DDP every rank at the same
        step, the first of every `log_every_n_steps` after any rank was signalled."""
        if trainer.world_size == 1:
            return self.received is not None
        if trainer.global_step % log_every(trainer) != 0:
            return False
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=trainer.strategy.root_device)
        return bool(trainer.strategy.reduce(flag, reduce_op="sum").item() > 0)


def wanted(env: dict[str, str] | None = None) -> bool:
    """Under SLURM (a job id in the environment), where the warning signal comes."""
    return "SLURM_JOB_ID" in (os.environ if env is None else env)
