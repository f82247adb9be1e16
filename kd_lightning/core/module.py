"""DistillationModule: the student, the Objective and the steps, as a LightningModule.

Teacher features reach the steps through one interface, a TeacherFeed (kd_lightning.teachers.feed: the
stores once complete, else the frozen teachers live); filling the stores and counting the teachers'
work is the TeacherPrecompute callback's (kd_lightning.teachers.precompute). The teachers are
deliberately *not* registered as a submodule: Lightning's per-epoch `.train()`, the optimizer, DDP's
gradient sync, `sync_batchnorm` and the checkpoint's state_dict never see them. `_apply` is extended so
`.to(device)` / dtype casts still move them with the module. Resuming therefore needs nothing from the
checkpoint for the teachers: they are rebuilt from their own files.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.types import OptimizerLRScheduler
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.config.optim import OptimSetup
from kd_lightning.core.objective import Objective
from kd_lightning.core.tally import StepTally, log_every
from kd_lightning.data.batch import Batch
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.teachers.ensemble import TeacherEnsemble
from kd_lightning.teachers.feed import TeacherFeed
from kd_lightning.teachers.outputs import TeacherOutputs


def _nested(value: object, *keys: str) -> Mapping[str, object]:
    """`value[k1][k2]...` of a checkpoint's nested dicts; an empty mapping where one is missing."""
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value if isinstance(value, Mapping) else {}


class DistillationModule(pl.LightningModule):
    # declared for the type checker (nn.Module's attribute lookup would type them Tensor | Module)
    student: nn.Module
    objective: Objective
    taps: FeatureTaps
    feed: TeacherFeed | None
    teacher_test_acc: nn.ModuleDict

    def __init__(
        self,
        student: nn.Module,
        objective: Objective,
        feed: TeacherFeed | None,
        student_taps: FeatureTaps,
        num_classes: int,
        optim: OptimSetup,
        channels_last: bool = False,
    ):
        super().__init__()
        self.student = student
        self.objective = objective
        object.__setattr__(self, "feed", feed)  # not a submodule: see the module docstring
        teachers = feed.teachers if feed is not None else None
        self.taps = student_taps
        self.optim = optim
        self.num_classes = num_classes
        self.needs_teachers = teachers is not None and objective.uses_teachers
        self.channels_last = channels_last  # perf.channels_last: inputs in NHWC like the models
        # the training loss, its parts and the accuracy, kept on the device and read every few steps
        self._tally = StepTally()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # test_each_epoch: the test split evaluated in the validation loop, and its accuracy after every
        # epoch (kept in the checkpoint, so that a resumed run still has the whole curve)
        self.epoch_test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_curve: list[float] = []
        self._val_roles: list[str] = ["val"]
        if teachers is not None:
            self.teacher_test_acc = nn.ModuleDict(
                {n: MulticlassAccuracy(num_classes, average="micro") for n in [*teachers.names, "ensemble"]}
            )
            self.test_agreement = MulticlassAccuracy(num_classes, average="micro")

    @property
    def teachers(self) -> TeacherEnsemble | None:
        return self.feed.teachers if self.feed is not None else None

    @property
    def teacher_outputs(self) -> TeacherOutputs | None:
        """The stores of the teachers' outputs (None: the teachers run on every batch)."""
        return self.feed.outputs if self.feed is not None else None

    # --- teachers travel with the module without being part of it ---------------------------
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.teachers is not None:
            self.teachers._apply(fn, *args, **kwargs)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    # --- steps -------------------------------------------------------------------------------
    def _input(self, batch: Batch) -> torch.Tensor:
        x = batch.x
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = self._input(batch), batch.y
        s_feats = self.taps(x)
        feed = self.feed if self.needs_teachers else None
        t_feats = feed.features(x, batch.index, batch.view, batch.targets) if feed is not None else None
        loss, parts = self.objective(s_feats, t_feats, y, index=batch.index, epoch=self.current_epoch, x=x)
        self._tally.add(self.global_step, len(y), loss, parts, s_feats["logits"], y)
        if self.global_step % log_every(self.trainer) == 0:
            self._read_tally()
            self.log(
                "train/loss_step", self._tally.last_loss, on_step=True, on_epoch=False, batch_size=len(y)
            )
        return loss

    @property
    def shown_loss(self) -> float:
        """The training loss at the latest read (every `trainer.log_every_n_steps` steps), for progress bars."""
        return self._tally.last_loss

    def _read_tally(self) -> None:
        """Read the steps tallied since the last read (one host read) and stop on a non-finite loss.

        Called at a logging step, before validation, before a checkpoint is saved and at the epoch's end,
        so no step in between waits for the GPU; every rank reads at the same steps and they agree."""
        if self._trainer is None:
            return
        self._tally.read(self.current_epoch, self.trainer.strategy.reduce)

    def on_train_epoch_start(self) -> None:
        self._tally.start_epoch()

    def on_train_epoch_end(self) -> None:
        self._read_tally()
        for name, value in self._tally.epoch_means(self.trainer.strategy.reduce).items():
            # already summed over the ranks; sync_dist averages equal values (and keeps Lightning quiet)
            self.log(f"train/{name}", value, on_epoch=True, sync_dist=True)

    def on_validation_start(self) -> None:
        self._read_tally()  # validation inside the fit: the weights it checks must be finite
        dm = getattr(self.trainer, "datamodule", None)
        val_roles = getattr(dm, "val_roles", None)
        self._val_roles = val_roles() if callable(val_roles) else ["val"]

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = self._input(batch), batch.y
        logits = self.student(x)
        if self._val_roles[dataloader_idx] == "test":
            self.epoch_test_acc.update(logits, y)
            return
        self.val_acc(logits, y)
        self.log(
            "val/ce",
            torch.nn.functional.cross_entropy(logits.float(), y),
            sync_dist=True,
            batch_size=len(y),
            add_dataloader_idx=False,
        )
        self.log("val/acc", self.val_acc, prog_bar=True, add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        if "test" not in self._val_roles:
            return
        acc = self.epoch_test_acc.compute()  # synced across ranks
        self.epoch_test_acc.reset()
        self.log("test_epoch/acc", acc, add_dataloader_idx=False)
        if not self.trainer.sanity_checking:
            self.test_curve.append(float(acc))

    def on_save_checkpoint(self, checkpoint: dict[str, object]) -> None:
        self._read_tally()  # a checkpoint of weights that a non-finite loss has touched is never written
        checkpoint["test_curve"] = list(self.test_curve)

    def on_load_checkpoint(self, checkpoint: dict[str, object]) -> None:
        curve = checkpoint.get("test_curve")
        self.test_curve = [float(a) for a in curve] if isinstance(curve, list) else []
        # A checkpoint saved mid-epoch records how far its loader got. Lightning hands that to the loader only
        # when it makes the loader after restoring, but this module's optimiser setup asks for the loader
        # (estimated_stepping_batches) before: the datamodule is told here, before either.
        loops = _nested(checkpoint, "loops", "fit_loop", "state_dict")
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        resume_after = getattr(dm, "resume_after", None)
        states = loops.get("combined_loader")
        for state in states if isinstance(states, list) else []:
            epoch, samples = _nested(state).get("epoch"), _nested(state).get("samples")
            if isinstance(epoch, int) and isinstance(samples, int) and callable(resume_after):
                resume_after(epoch, samples)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        x, y = self._input(batch), batch.y
        logits = self.student(x)
        self.test_acc(logits, y)
        self.log("test/acc", self.test_acc)
        if self.teachers is not None:
            feats = self.teachers(x)
            for name in self.teachers.names:
                self._teacher_acc(name)(feats[name]["logits"], y)
                self.log(f"test/teacher/{name}/acc", self._teacher_acc(name))
            ens = self.teachers.combined_logits(feats)
            self._teacher_acc("ensemble")(ens, y)
            self.log("test/teacher/ensemble/acc", self._teacher_acc("ensemble"))
            self.test_agreement(logits.argmax(1), ens.argmax(1))
            self.log("test/agreement", self.test_agreement)

    def _teacher_acc(self, name: str) -> MulticlassAccuracy:
        metric = self.teacher_test_acc[name]
        assert isinstance(metric, MulticlassAccuracy)
        return metric

    # --- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> OptimizerLRScheduler:
        params = [p for p in self.parameters() if p.requires_grad]  # student + adapters + loss heads
        return self.optim.configure(params, int(self.trainer.estimated_stepping_batches))
