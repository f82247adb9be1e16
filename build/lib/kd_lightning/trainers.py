"""The Lightning Trainers of a run: the configured one (callbacks and loggers from config) and, after a
multi-process fit, a one-device trainer for the test."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ProgressBar

from kd_lightning.build import instantiate


def _instantiate_all(node: DictConfig | None, group: str) -> list[Any]:
    if not node:
        return []
    return [instantiate(c, f"{group}.{k}") for k, c in node.items() if c is not None and "_target_" in c]


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    callbacks = _instantiate_all(cfg.get("callbacks"), "callbacks")
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _instantiate_all(cfg.get("logger"), "logger")
    return instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)


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


def finish_loggers(trainer: pl.Trainer) -> None:
    """End each logger's run with the job. Lightning leaves a W&B run open, and the next job of a multirun
    in the same process would then log into it; MLflow and the file loggers are closed by Lightning."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
