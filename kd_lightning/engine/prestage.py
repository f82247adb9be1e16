"""Pre-stages: what a method trains before distillation starts, one mechanism for every method (the
record a loss returns, `PreStage`, is kd_lightning.losses.protocol's).

Some methods need a part trained first (RepDistiller's `init` stage, 30 epochs). A loss class declares it
by a method `pre_stage() -> PreStage`: the stage's loss on (adapted student feature, teacher target),
computed as the term computes its own loss (per teacher, or on the combined target), and what it trains:
- `module`: the loss's own part (Factor Transfer's paraphraser, an autoencoder of the teacher's
  features), frozen (requires_grad False) outside the stage;
- `student=True`: the student's layers except its classifier (FSP: RepDistiller's get_feat_modules).
With `only=True` the term acts in its pre-stage alone (RepDistiller sets FSP's loss to 0 afterwards):
the term's weight scales the pre-stage loss and the fit skips the term. `run_pre_stages` trains every
declared pre-stage of an objective, those with the same number of epochs together, with the run's
optimiser (no schedule, as RepDistiller's init stage), on the training split; the teachers do not change.
A resumed run skips it: what it trained is in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.types import OptimizerLRScheduler
from torch import nn

from kd_lightning.data.batch import Batch
from kd_lightning.losses.protocol import PreStage
from kd_lightning.plain import Plain

if TYPE_CHECKING:
    from kd_lightning.core.module import DistillationModule
    from kd_lightning.data.base import TensorDataModule


def student_feature_parameters(student: nn.Module) -> list[nn.Parameter]:
    """Every student parameter but those of its last nn.Linear (the classifier)."""
    heads = [m for m in student.modules() if isinstance(m, nn.Linear)]
    skip = {id(p) for p in heads[-1].parameters()} if heads else set()
    return [p for p in student.parameters() if id(p) not in skip]


@contextmanager
def trainable(modules: list[nn.Module]) -> Iterator[None]:
    for m in modules:
        m.requires_grad_(True)
    try:
        yield
    finally:
        for m in modules:
            m.requires_grad_(False)


Stage = tuple[str, str, PreStage]  # (term name, loss key, pre-stage)


def declared_pre_stages(distill: DistillationModule) -> list[Stage]:
    return [(name, key, st) for name, term in distill.objective.term.items() for key, st in term.pre_stages()]


class PreStageModule(pl.LightningModule):
    """Trains the given pre-stage modules on the training split; nothing else has gradients."""

    distill: DistillationModule  # declared for the type checker: set with object.__setattr__

    def __init__(self, distill: DistillationModule, stages: list[Stage]):
        super().__init__()
        self.stages = stages
        self.trained = nn.ModuleList([st.module for _, _, st in self.stages if st.module is not None])
        self.trains_student = any(st.student for _, _, st in self.stages)
        object.__setattr__(self, "distill", distill)  # not a submodule: its optimiser is not this one's

    def on_train_epoch_start(self) -> None:
        # RepDistiller's init: the student in eval mode unless its layers are what the stage trains
        self.distill.student.train(self.trains_student)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        d = self.distill
        x = batch.x
        with torch.set_grad_enabled(self.trains_student):
            s_feats = d.taps(x)
        if d.teachers is None:
            raise RuntimeError("a pre-stage trains against the teachers, and this module has none")
        with torch.no_grad():
            t_feats = d.teachers(x)
        total = x.new_zeros((), dtype=torch.float32)
        for name, key, stage in self.stages:
            term = d.objective.term[name]
            loss = term.pre_stage_loss(key, stage, s_feats, t_feats)
            total = total + (term.weight * loss if stage.only else loss)
        self.log("pre_stage/loss", total, on_step=False, on_epoch=True, batch_size=len(x))
        return total

    def parameters_trained(self) -> list[nn.Parameter]:
        params = list(self.trained.parameters())
        if self.trains_student:
            params += student_feature_parameters(self.distill.student)
        return params

    def configure_optimizers(self) -> OptimizerLRScheduler:
        return self.distill.optim.optimizer(self.parameters_trained())


def run_pre_stages(distill: DistillationModule, dm: TensorDataModule, accelerator: str) -> dict[str, Plain]:
    """Trains every pre-stage the objective declares; returns what results.json records (empty if none)."""
    from kd_lightning.engine.fitting import quiet_trainer

    stages = declared_pre_stages(distill)
    if not stages:
        return {}
    losses: dict[str, Plain] = {}  # by the stage's epochs, as results.json's keys are (text)
    for epochs in sorted({st.epochs for _, _, st in stages}):
        group = [x for x in stages if x[2].epochs == epochs]
        module = PreStageModule(distill, group)
        trainer = quiet_trainer(epochs, accelerator)
        with trainable(list(module.trained)):
            trainer.fit(module, datamodule=dm)
        loss = trainer.callback_metrics.get("pre_stage/loss")
        losses[str(epochs)] = float(loss) if loss is not None else None
    return {
        "pre_stage_terms": sorted({name for name, _, _ in stages}),
        "pre_stage_last_loss_by_epochs": losses,
    }
