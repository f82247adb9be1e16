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

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.config.optim import OptimSetup
from kd_lightning.core.objective import Objective
from kd_lightning.data.batch import Batch
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.teachers.ensemble import TeacherEnsemble
from kd_lightning.teachers.feed import TeacherFeed
from kd_lightning.teachers.outputs import TeacherOutputs


class DistillationModule(pl.LightningModule):
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
        self._epoch_sums: dict[str, torch.Tensor] = {}
        self._epoch_count = 0
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
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
        t_feats = self.feed.features(x, batch.cache_slot) if self.needs_teachers else None
        loss, parts = self.objective(s_feats, t_feats, y, index=batch.index, epoch=self.current_epoch, x=x)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.detach().item()}) at epoch {self.current_epoch}, step {self.global_step}: "
                f"parts { ({k: float(v.detach()) for k, v in parts.items()}) }. Lower optim.lr or the term weights"
            )
        self.train_acc.update(s_feats["logits"].detach(), y)
        # Epoch means are summed here and logged once per epoch: a `self.log` call costs about a
        # millisecond, as much as a whole step of a small student.
        n = len(y)
        for name, value in (("loss", loss), *parts.items()):
            acc = self._epoch_sums.get(name)
            self._epoch_sums[name] = value.detach() * n if acc is None else acc + value.detach() * n
        self._epoch_count += n
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log(
                "train/loss_step", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=n
            )
        return loss

    def on_train_epoch_start(self) -> None:
        self._epoch_sums, self._epoch_count = {}, 0

    def on_train_epoch_end(self) -> None:
        for name, total in self._epoch_sums.items():
            self.log(f"train/{name}", total / max(1, self._epoch_count), on_epoch=True, sync_dist=True)
        self.log("train/acc", self.train_acc.compute(), on_epoch=True, sync_dist=True)
        self.train_acc.reset()

    def on_validation_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        self._val_roles = dm.val_roles() if hasattr(dm, "val_roles") else ["val"]

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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["test_curve"] = list(self.test_curve)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.test_curve = [float(a) for a in checkpoint.get("test_curve", [])]

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        x, y = self._input(batch), batch.y
        logits = self.student(x)
        self.test_acc(logits, y)
        self.log("test/acc", self.test_acc)
        if self.teachers is not None:
            feats = self.teachers(x)
            for name in self.teachers.names:
                self.teacher_test_acc[name](feats[name]["logits"], y)
                self.log(f"test/teacher/{name}/acc", self.teacher_test_acc[name])
            ens = self.teachers.combined_logits(feats)
            self.teacher_test_acc["ensemble"](ens, y)
            self.log("test/teacher/ensemble/acc", self.teacher_test_acc["ensemble"])
            self.test_agreement(logits.argmax(1), ens.argmax(1))
            self.log("test/agreement", self.test_agreement)

    # --- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]  # student + adapters + loss heads
        return self.optim.configure(params, int(self.trainer.estimated_stepping_batches))
