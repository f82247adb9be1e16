"""The Lightning Trainers of a run: the configured one (callbacks and loggers from config) and, after a
multi-process fit, a one-device trainer for the test."""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter as _ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.plugins.io import TorchCheckpointIO

from kd_lightning.config.hydra import instantiate
from kd_lightning.config.run_spec import RunSpec
from kd_lightning.config.specs import TargetSpec
from kd_lightning.core.tally import log_every
from kd_lightning.errors import ConfigError
from kd_lightning.files import atomic_write, save_torch_atomic
from kd_lightning.plain import Plain, plain_list, plain_num


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); nothing partial was left."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all: to a temporary name in their own folder, flushed to disk,
    then renamed. Lightning's own save writes the temporary file in the system's temp folder and copies it
    across filesystems (fsspec's local transaction), so a disk that fills during the copy leaves a truncated
    checkpoint under its final name, which resume=auto would then read."""

    def save_checkpoint(
        self, checkpoint: dict[str, object], path: str | os.PathLike[str], storage_options: object = None
    ) -> None:
        path = Path(path)
        try:
            save_torch_atomic(path, checkpoint)
        except OSError as e:
            kept = sorted(p.name for p in path.parent.glob("*.ckpt"))
            raise CheckpointSaveError(
                e.errno,
                f"could not save checkpoint {path} ({e.strerror or e}); nothing partial was left, the earlier "
                f"checkpoints are intact ({', '.join(kept) or 'none yet'}). Free space in {path.parent} and "
                "continue with resume=auto",
            ) from e


# Lightning's INFO lines (the device lines, its tips, "Loading `train_dataloader`...", "Trainer.fit stopped",
# checkpoint restoring) and the seed line: hidden unless `verbose=true`.
_CHATTY = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning_fabric.utilities.seed",
)


def quiet_lightning(verbose: bool) -> None:
    """Keep the console to what the run says itself: Lightning's informational lines and a deprecation
    warning raised inside Lightning are shown only with `verbose`; its warnings (a real problem) always are."""
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


PROGRESS_KEY = "kd_run_progress"  # in a checkpoint: the times of the epochs it holds


class RunProgress(pl.Callback):
    """results.json while the fit runs, rewritten atomically by rank 0 once each epoch's checkpoints are
    written (at the next epoch's start, and when training ends): `status: running` with `progress` (the
    epochs done of max_epochs: what last.ckpt holds), the wall time of each epoch (`epoch_seconds`, its
    validation included), the fit time so far (`fit_seconds`) and the training samples × teachers the
    teachers ran on so far (`teacher_forward_samples`: rank 0's count times the ranks, exact at the end),
    and on a GPU the peak memory its tensors took (`peak_gpu_memory_mib`). A resumed run adds the earlier
    attempts' time, teacher work and kept epochs to its own (`carry`; `attempts` counts them)."""

    def __init__(self, results: dict[str, Plain], path: Path, forward_samples: Callable[[], int] = lambda: 0):
        self.results, self.path = results, path
        self.forward_samples = forward_samples  # this process's teacher samples so far
        self.started = self.fit_started = 0.0
        self.epochs: list[float] = []  # this attempt's
        # the earlier attempts' fit time, teacher samples and epoch times
        self.carried_seconds, self.carried_samples, self.carried_epochs = 0.0, 0, list[float]()
        self.attempts = 1
        self._first_epoch = 0

    def carry(self, earlier: Mapping[str, Plain], epochs_kept: int) -> None:
        """Continue the earlier attempt of this run: its time and teacher work, and the epochs its checkpoint
        holds (an epoch it finished after that checkpoint is done again, and counted once)."""
        self.carried_seconds = plain_num(earlier.get("fit_seconds") or 0.0, "fit_seconds")
        self.carried_samples = int(
            plain_num(earlier.get("teacher_forward_samples") or 0, "teacher_forward_samples")
        )
        epochs = plain_list(earlier.get("epoch_seconds"), "epoch_seconds")
        self.carried_epochs = [plain_num(v, "epoch_seconds") for v in epochs][:epochs_kept]
        self.attempts = int(plain_num(earlier.get("attempts") or 1, "attempts")) + 1

    def totals(self, fit_seconds: float, teacher_forward_samples: int) -> dict[str, Plain]:
        """The run's figures over its attempts, from this attempt's own."""
        return {
            "fit_seconds": self.carried_seconds + fit_seconds,
            "teacher_forward_samples": self.carried_samples + teacher_forward_samples,
            "epoch_seconds": [*self.carried_epochs, *self.epochs],
            "attempts": self.attempts,
        }

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_started = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_epoch = trainer.current_epoch  # after a resume: the first epoch this attempt trains

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epochs:  # the epoch before this one and its checkpoints are done
            self._write(trainer, pl_module)
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.epochs.append(round(time.perf_counter() - self.started, 4))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    # The epochs' times travel in the checkpoint too: a stop between an epoch's checkpoint and the next write
    # of results.json (SIGTERM, preemption) leaves results.json one epoch behind, and the resumed run takes
    # the times of the epochs it continues from the checkpoint that holds them.
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, object]
    ) -> None:
        epochs = [*self.carried_epochs, *self.epochs]
        ending = getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False)
        if ending and len(self.epochs) <= trainer.current_epoch - self._first_epoch:  # saved before its end
            epochs.append(round(time.perf_counter() - self.started, 4))
        checkpoint[PROGRESS_KEY] = {"epoch_seconds": epochs}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, object]
    ) -> None:
        saved = checkpoint.get(PROGRESS_KEY)
        if isinstance(saved, dict):
            self.carried_epochs = [float(v) for v in saved["epoch_seconds"]]

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from kd_lightning.files import write_json_atomic

        so_far = self.forward_samples() * trainer.world_size
        self.results.update(self.totals(time.perf_counter() - self.fit_started, so_far))
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
            before = plain_num(self.results.get("peak_gpu_memory_mib", 0), "peak_gpu_memory_mib")
            self.results["peak_gpu_memory_mib"] = round(max(peak, before), 1)
        self.results["progress"] = {"epochs_done": trainer.current_epoch, "max_epochs": trainer.max_epochs}
        write_json_atomic(self.path, self.results)


def _instantiate_all(node: Mapping[str, TargetSpec | None], group: str) -> list[object]:
    """Every entry that names a `_target_` (an entry set to null is off)."""
    return [instantiate(c.config, f"{group}.{k}") for k, c in node.items() if c is not None and c._target_]


def build_trainer(
    spec: RunSpec, validation: bool = True, callbacks: Iterable[pl.Callback] = ()
) -> pl.Trainer:
    """The configured Trainer, with the run's own `callbacks` (the teacher precompute) after the configured
    ones. Without a validation split (`validation=False`), a checkpoint callback that monitors a val/
    metric keeps the last epoch instead; any other callback that monitors one is an error."""
    configured = spec.callbacks if validation else _without_validation(spec.callbacks)
    made = _instantiate_all(configured, "callbacks")
    if not spec.trainer.options.get("enable_progress_bar", True):
        made = [c for c in made if not isinstance(c, ProgressBar)]
    loggers = _instantiate_all(spec.logger, "logger")
    extra: dict[str, Any] = {}
    if not spec.trainer.options.get("plugins"):
        extra["plugins"] = [AtomicCheckpointIO()]
    trainer = instantiate(
        spec.trainer.options, "trainer", callbacks=[*made, *callbacks], logger=loggers or False, **extra
    )
    broadcast_sigterm_every_n_steps(trainer)
    return trainer


def build_pack_trainer(spec: RunSpec, folder: Path, callbacks: Iterable[pl.Callback] = ()) -> pl.Trainer:
    """The Trainer of packed jobs (kd_lightning.core.packed): the jobs' trainer settings, the pack's own
    checkpoints/last.ckpt in `folder` (resume=auto continues the pack from it), no logger (each job's figures
    go to its results.json) and the given `callbacks`."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    last = ModelCheckpoint(
        dirpath=folder / "checkpoints",
        filename="last",
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
    )
    options = {**spec.trainer.options, "default_root_dir": str(folder)}
    extra: dict[str, Any] = {} if spec.trainer.options.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    trainer = instantiate(options, "trainer", callbacks=[last, *callbacks], logger=False, **extra)
    broadcast_sigterm_every_n_steps(trainer)
    return trainer


def broadcast_sigterm_every_n_steps(trainer: pl.Trainer) -> None:
    """Under DDP, Lightning 2.6 broadcasts a "SIGTERM received" flag from rank 0 before every training step
    and reads it on the host: a GPU wait per step (Lightning issue #21487). Here the ranks broadcast it every
    `trainer.log_every_n_steps` steps, at the steps where kd_lightning reads its loss anyway, all ranks at
    the same steps: a signal stops the ranks together, at most that many steps later (what Lightning's
    proposed `broadcast_sigterm_every_n_steps`, PR #21640, does; a Lightning that has it is left alone)."""
    loop = trainer.fit_loop.epoch_loop
    every = getattr(loop, "_broadcast_sigterm_tensor", None)
    if every is None or hasattr(trainer, "broadcast_sigterm_every_n_steps"):
        return
    n = log_every(trainer)

    def sparse() -> None:
        if trainer.global_step % n == 0:
            every()

    loop._broadcast_sigterm_tensor = sparse  # type: ignore[method-assign]  # Lightning's own hook, thinned


def _without_validation(callbacks: Mapping[str, TargetSpec | None]) -> dict[str, TargetSpec | None]:
    out = {}
    for name, cb in callbacks.items():
        monitor = cb.options.get("monitor") if cb is not None else None
        if cb is not None and isinstance(monitor, str) and monitor.startswith("val/"):
            if not str(cb._target_ or "").endswith("ModelCheckpoint"):
                raise ConfigError(
                    f"callbacks.{name} monitors {monitor}, but data.val_fraction=0 leaves no validation split; "
                    f"remove it (callbacks.{name}=null) or set data.val_fraction > 0"
                )
            cb = dataclasses.replace(
                cb, options={**cb.options, "monitor": None}
            )  # save_top_k=1: the last epoch
        out[name] = cb
    return out


def evaluation_trainer(trainer: pl.Trainer) -> pl.Trainer:
    """After a multi-process fit, rank 0 tests alone on one device: every test sample counted exactly once
    (a DistributedSampler would pad the test set with repeats)."""
    if trainer.world_size == 1:
        return trainer
    root = trainer.strategy.root_device
    return pl.Trainer(
        accelerator="gpu" if root.type == "cuda" else root.type,
        devices=[root.index] if root.type == "cuda" else 1,
        precision=trainer.precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=trainer.default_root_dir,
    )


def log_final_results(trainer: pl.Trainer, metrics: Mapping[str, float | None]) -> None:
    """The run's final figures in every tracker, beside the config the fit logged as its hyperparameters:
    in TensorBoard as the HPARAMS tab's metrics (one row per run there, filterable by any config key)."""
    from pytorch_lightning.loggers import TensorBoardLogger

    final = {f"final/{k}": float(v) for k, v in metrics.items() if v is not None}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(dict(trainer.lightning_module.hparams), final)
        else:
            logger.log_metrics(final, step=trainer.global_step)
        logger.save()


def finish_loggers(trainer: pl.Trainer) -> None:
    """End each logger's run with the job. Lightning leaves a W&B run open, and the next job of a multirun
    in the same process would then log into it; MLflow and the file loggers are closed by Lightning."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, except that a resumed run keeps the rows of the epochs it does not redo.

    Lightning's deletes metrics.csv whenever its folder exists, and kd_lightning resumes a run in its own
    folder: the metrics of every epoch before the interruption would be lost. `resume_epoch` (set by the
    runner when it resumes from a checkpoint saved at the end of that epoch) keeps the rows up to it and
    drops the rows of the partial epoch that is redone."""

    resume_epoch: int | None = None

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        rows, header = [], []
        if self.resume_epoch is not None and path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = [
                    r for r in reader if not r.get("epoch") or int(float(r["epoch"])) <= self.resume_epoch
                ]
        with warnings.catch_warnings():  # "previous log files will be deleted": the rows are kept, below
            if self.resume_epoch is not None:
                warnings.filterwarnings(
                    "ignore", message=".*Previous log files in this directory will be deleted"
                )
            writer = super().experiment  # deletes metrics.csv
        if header:
            _write_rows(path, header, rows)
            writer.metrics_keys = header
        writer.save = lambda: _save_whole(writer)
        return writer


def _write_rows(path: Path, header: list[str], rows: Iterable[Mapping[str, object]]) -> None:
    """metrics.csv, whole (a temporary file, then a rename)."""
    import io

    from kd_lightning.files import write_text_atomic

    text = io.StringIO()
    out = csv.DictWriter(text, fieldnames=header)
    out.writeheader()
    out.writerows(rows)
    write_text_atomic(path, text.getvalue())


def _save_whole(writer: _ExperimentWriter) -> None:
    """Lightning's CSV writer appends rows to metrics.csv, and rewrites it in place when a column appears:
    a full disk then leaves a cut row, or loses every earlier row. Here hparams.yaml and metrics.csv are
    written whole each time (the earlier rows read back, a temporary file, a rename)."""
    from pytorch_lightning.core.saving import save_hparams_to_yaml

    hparams = Path(writer.log_dir) / writer.NAME_HPARAMS_FILE
    atomic_write(hparams, lambda tmp: save_hparams_to_yaml(str(tmp), writer.hparams))
    if not writer.metrics:
        return
    writer._record_new_keys()
    path = Path(writer.metrics_file_path)
    earlier = []
    if path.is_file():
        with path.open(newline="") as f:
            earlier = list(csv.DictReader(f))
    _write_rows(path, writer.metrics_keys, [*earlier, *writer.metrics])
    writer.metrics = []


def keep_metrics_until(trainer: pl.Trainer, epoch: int) -> None:
    """Resuming from a checkpoint saved at the end of `epoch`: the file loggers keep the earlier rows."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.resume_epoch = epoch
