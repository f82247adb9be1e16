"""Packed students: the jobs of a sweep that differ only in their teachers and objective, trained as one.

K students of one architecture become one module (`PackedStudents`): their weights stacked, `[K, ...]` per
tensor (torch.func.stack_module_state), and one forward for all of them (torch.func.vmap of the
architecture's own forward over the stack, through torch.func.functional_call). `PackedModule` trains them
on one batch per step: the union of the jobs' teachers runs once per batch (or is read once from its
stores), each job's objective (its adapters and loss heads, its teacher subset) scores its own student, and
one optimizer step updates everything. Each job's loss depends on its own parameters only, so the gradient
of the summed loss is each job's own gradient; the optimisers we pack (elementwise: SGD, Adam, AdamW, ...)
then make the same updates as K separate runs, to float rounding (a batched matmul in place of K single
ones). Hand-written: neither Lightning nor torch offers fused training of independent models (HFTA is a
research prototype).

Validation picks each job's best epoch as a job alone would (callbacks.model_checkpoint: the first epoch of
the highest val/acc): the pack keeps that epoch's weights of each student, for its test.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.types import OptimizerLRScheduler
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.core.module import DistillationModule
from kd_lightning.core.tally import StepTally, log_every
from kd_lightning.data.batch import Batch
from kd_lightning.models.taps import OUTPUT, FeatureTaps
from kd_lightning.teachers.feed import TeacherFeed
from kd_lightning.tensors import add_all

State = dict[str, torch.Tensor]


def _key(name: str) -> str:
    """A parameter's name as a key of the packed module's own (dots are not allowed there)."""
    return name.replace(".", "__")


class PackedStudents(nn.Module):
    """K students of one architecture: the weights stacked, one vmapped forward returning every tap
    `[K, B, ...]`. `taps` are the taps of the first student, whose modules the forward runs with each
    student's weights in turn (its own weights are left as they are)."""

    template: nn.Module  # declared for the type checker: set with object.__setattr__ (not submodules)
    taps: FeatureTaps

    def __init__(self, students: Sequence[nn.Module], taps: FeatureTaps):
        super().__init__()
        params, buffers = stack_module_state(list(students))  # copies: the students keep their own
        self.names = list(params)
        self.buffer_names = list(buffers)
        self.weights = nn.ParameterDict({_key(k): nn.Parameter(v) for k, v in params.items()})
        for k, v in buffers.items():
            self.register_buffer(_key(k), v)
        self.k = len(students)
        random = any(isinstance(m, nn.Dropout) and m.p > 0 for m in students[0].modules())
        # dropout: a different mask per student (as separate runs draw), from the one generator
        self.randomness = "different" if random else "error"
        object.__setattr__(self, "template", students[0])  # not a submodule: its weights are not trained
        object.__setattr__(self, "taps", taps)

    def _state(self) -> tuple[State, State]:
        params = {k: self.weights[_key(k)] for k in self.names}
        buffers = {k: getattr(self, _key(k)) for k in self.buffer_names}
        return params, buffers

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        template, taps = self.template, self.taps
        template.train(self.training)  # BN and dropout follow the packed module's mode

        def one(params: State, buffers: State, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
            return taps.collect(lambda: functional_call(template, {**params, **buffers}, (inputs,)))

        params, buffers = self._state()
        return vmap(one, in_dims=(0, 0, None), randomness=self.randomness)(params, buffers, x)

    @torch.no_grad()
    def state_of(self, k: int) -> State:
        """Student `k`'s weights and buffers, as its own module's state_dict names them (copies)."""
        params, buffers = self._state()
        return {name: t[k].detach().clone() for name, t in {**params, **buffers}.items()}

    @torch.no_grad()
    def unpack_into(self, k: int, student: nn.Module, state: State | None = None) -> None:
        """Student `k`'s weights (or `state`, kept from an earlier epoch) into `student`."""
        student.load_state_dict(state if state is not None else self.state_of(k), strict=False)


class PackedModule(pl.LightningModule):
    """Fits the jobs' students together (see the module's docstring). `jobs` are the jobs' own modules,
    built as each job alone builds it (its seed, student, adapters, optimiser); `members[k]` names the
    teachers job k reads from `feed` (the union's). The jobs' optimisers are one configuration (the pack's
    key), so one of them optimises all the parameters."""

    def __init__(
        self, jobs: Sequence[DistillationModule], feed: TeacherFeed | None, members: Sequence[list[str]]
    ):
        super().__init__()
        # every tap some job reads, recorded on the first student's modules (the jobs' own taps come off:
        # their modules do not train, they are tested through their students' forward)
        taps = {k: v for j in jobs for k, v in j.taps.specs.items() if k != OUTPUT}
        for j in jobs:
            j.taps.remove()
        self.students = PackedStudents(
            [j.student for j in jobs], FeatureTaps(jobs[0].student, taps, owner="student")
        )
        self.objectives = nn.ModuleList([j.objective for j in jobs])
        self.members = [list(m) for m in members]
        self.val_acc = nn.ModuleList(MulticlassAccuracy(j.num_classes, average="micro") for j in jobs)
        object.__setattr__(self, "jobs", list(jobs))
        object.__setattr__(self, "feed", feed)
        self.tallies = [StepTally() for _ in jobs]
        self.needs_teachers = feed is not None and any(
            j.objective.uses_teachers and m for j, m in zip(jobs, self.members, strict=True)
        )
        # each job's best epoch by val/acc so far (strictly higher replaces, as ModelCheckpoint does)
        self.best_acc = [-math.inf] * len(jobs)
        self.best_epoch: list[int | None] = [None] * len(jobs)
        self.best_state: list[State | None] = [None] * len(jobs)
        self.val_curves: list[list[float]] = [[] for _ in jobs]

    jobs: list[DistillationModule]  # declared for the type checker: set with object.__setattr__
    feed: TeacherFeed | None

    def _apply(self, fn, *args, **kwargs):  # the teachers travel with the module, as DistillationModule's
        super()._apply(fn, *args, **kwargs)
        if self.feed is not None:
            self.feed.teachers._apply(fn, *args, **kwargs)
        return self

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch.x, batch.y
        student = self.students(x)
        feed = self.feed if self.needs_teachers else None
        teachers = feed.features(x, batch.index, batch.view, batch.targets) if feed is not None else None
        losses = []
        for k, objective in enumerate(self.objectives):
            mine = {tap: v[k] for tap, v in student.items()}
            theirs = (
                {m: teachers[m] for m in self.members[k]}
                if teachers is not None and self.members[k]
                else None
            )
            loss, parts = objective(mine, theirs, y, index=batch.index, epoch=self.current_epoch, x=x)
            self.tallies[k].add(self.global_step, len(y), loss, parts, mine[OUTPUT], y)
            losses.append(loss)
        if self.global_step % log_every(self.trainer) == 0:
            self._read_tallies()
        return add_all(losses)

    def _read_tallies(self) -> None:
        """Every job's steps since the last read, in one host read each; a non-finite loss stops the pack."""
        if self._trainer is None:
            return
        for tally in self.tallies:
            tally.read(self.current_epoch)

    def on_train_epoch_start(self) -> None:
        for tally in self.tallies:
            tally.start_epoch()

    def on_train_epoch_end(self) -> None:
        self._read_tallies()
        for k, tally in enumerate(self.tallies):
            for name, value in tally.epoch_means().items():
                self.log(f"train/{name}/{k}", value, on_epoch=True)

    def on_validation_start(self) -> None:
        self._read_tallies()

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self.students(batch.x)[OUTPUT]
        for k in range(len(self.jobs)):
            self.val_metric(k).update(logits[k], batch.y)

    def on_validation_epoch_end(self) -> None:
        for k in range(len(self.jobs)):
            metric = self.val_metric(k)
            acc = float(metric.compute())
            metric.reset()
            self.log(f"val/acc/{k}", acc)
            if self.trainer.sanity_checking:
                continue
            self.val_curves[k].append(acc)
            if acc > self.best_acc[k]:
                self.best_acc[k], self.best_epoch[k] = acc, self.current_epoch
                self.best_state[k] = self.students.state_of(k)

    def on_save_checkpoint(self, checkpoint: dict[str, object]) -> None:
        self._read_tallies()
        checkpoint["kd_pack"] = {
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "val_curves": self.val_curves,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, object]) -> None:
        saved = checkpoint.get("kd_pack")
        if isinstance(saved, Mapping):
            self.best_acc = list(saved["best_acc"])
            self.best_epoch = list(saved["best_epoch"])
            self.best_state = list(saved["best_state"])
            self.val_curves = [list(c) for c in saved["val_curves"]]

    def configure_optimizers(self) -> OptimizerLRScheduler:
        params = [p for p in self.parameters() if p.requires_grad]  # the stacked students + every objective
        setup = self.jobs[0].optim
        make = setup.optimizer
        if (  # our choice, on the CPU: torch's multi-tensor update (the same arithmetic, one op per step over
            # the many tensors of K jobs instead of one per tensor); on a GPU fused_on_gpu decides
            isinstance(make, functools.partial)
            and not any(p.is_cuda for p in params)
            and not {"foreach", "fused"} & set(make.keywords)
            and "foreach" in inspect.signature(make.func).parameters
        ):
            setup = dataclasses.replace(setup, optimizer=functools.partial(make, foreach=True))
        return setup.configure(params, int(self.trainer.estimated_stepping_batches))

    def unpack(self) -> None:
        """Each job's student gets its trained weights (the last epoch's)."""
        for k, job in enumerate(self.jobs):
            self.students.unpack_into(k, job.student)

    def val_metric(self, k: int) -> MulticlassAccuracy:
        metric = self.val_acc[k]
        assert isinstance(metric, MulticlassAccuracy)
        return metric
