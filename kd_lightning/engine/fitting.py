"""Supervised fits inside a run: teachers fitted on first use, source-task pre-training, the student-alone
baseline. One device, quiet, and the global RNG state restored afterwards (the main run is unchanged)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from kd_lightning.config.optim import OptimSetup, adam_cosine, build_optim
from kd_lightning.config.specs import FitSpec, spec_dict
from kd_lightning.core.module import DistillationModule
from kd_lightning.core.objective import Objective
from kd_lightning.data.base import TensorDataModule
from kd_lightning.models import create_model, save_model
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.plain import Plain


def supervised_module(model: nn.Module, num_classes: int, optim: OptimSetup) -> DistillationModule:
    """The model alone, trained with cross-entropy (a DistillationModule without teachers or terms)."""
    return DistillationModule(model, Objective(1.0, {}), None, FeatureTaps(model, []), num_classes, optim)


def quiet_trainer(max_epochs: int, accelerator: str = "cpu") -> pl.Trainer:
    """One device, no logger, checkpoints, progress bar or validation: for fits inside a run."""
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def fit_supervised(
    spec: Mapping[str, Plain],
    dm: TensorDataModule,
    seed: int,
    max_epochs: int,
    optim: OptimSetup,
    accelerator: str = "cpu",
    out_path: Path | None = None,
    meta: Mapping[str, Plain] | None = None,
) -> tuple[nn.Module, float]:
    """Train `spec` alone on `dm` with cross-entropy; returns the model (in eval mode) and its test accuracy,
    and writes a self-describing model file to `out_path` when given."""
    rng = torch.random.get_rng_state()
    pl.seed_everything(seed, workers=True, verbose=False)
    model = create_model(spec, dm.num_classes, dm.input_shape)
    module = supervised_module(model, dm.num_classes, optim)
    trainer = quiet_trainer(max_epochs, accelerator)
    t0 = time.perf_counter()
    copy = dm.reshuffled(seed)  # the fit's own seed orders its batches; the run's datamodule is not touched
    trainer.fit(module, datamodule=copy)
    acc = float(trainer.test(module, datamodule=copy, verbose=False)[0]["test/acc"])
    torch.random.set_rng_state(rng)
    if out_path is not None:
        meta = {"test_acc": acc, "fit_seconds": time.perf_counter() - t0, **(meta or {})}
        save_model(model, out_path, spec, dm.num_classes, dm.input_shape, meta=meta)
    model.eval()
    return model, acc


def fit_model(
    spec: Mapping[str, Plain],
    dm: TensorDataModule,
    fit: FitSpec,
    accelerator: str = "cpu",
    out_path: Path | None = None,
    meta: Mapping[str, Plain] | None = None,
) -> tuple[nn.Module, float]:
    """A teacher or source-task fit as its `fit:` block says: Adam with a cosine schedule, or its own
    `optim` and `scheduler`."""
    if fit.optim is not None:
        optim = build_optim(fit.optim, fit.scheduler)
    else:
        optim = adam_cosine(fit.lr, fit.weight_decay, fit.max_epochs)
    meta = {"fit": spec_dict(fit), **(meta or {})}
    return fit_supervised(spec, dm, fit.seed, fit.max_epochs, optim, accelerator, out_path, meta)
