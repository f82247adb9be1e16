"""Ye et al. (2019), amalgamating filtered knowledge: a task-customised student from multi-task teachers,
without labels, trained block by block.

- Tasks are functions of the dataset's class label (`TASKS`: digit, parity, ≥ 5, mod 3). Teachers are
  multi-task networks (shared conv blocks, one head per task), fitted with labels once and cached: they
  stand for the "pre-trained networks released online".
- The student picks a subset of the teachers' tasks. It never sees a label: block k of the student
  (earlier blocks frozen) is trained so that, through one learned 1×1 projection per teacher, it
  reproduces block k of every teacher that holds a chosen task. The teachers' channels are *filtered*
  for the chosen tasks: each channel's squared error is weighted by its first-order (Taylor) importance
  |t · ∂ℓ/∂t| for those tasks' heads, ℓ the CE against the teacher's own prediction (label-free);
  weights are normalised to mean 1 per teacher and block. `filter: none` weighs every channel equally.
- `block_stage: entangled` (closer to the authors' public re-implementation; every detail our choice):
  block k's output goes through a channel attention of its own per teacher (squeeze-and-excitation: a
  per-sample sigmoid gate on each student channel) and the 1×1 projection, then through that teacher's
  *remaining* frozen blocks and its heads for the chosen tasks. The block learns from the filtered
  feature error above plus the KL divergence between those heads' outputs and the teacher's own
  outputs on the input (T², temperature `temperature`), so the student's block must serve the
  teacher's own later layers on the chosen tasks ("entangles the student's block with the teachers").
- Then the student's heads learn the chosen tasks from the matching teachers' soft outputs (Hinton KD),
  and with `finetune_epochs` every student weight does.
The selection module of the paper is replaced by this importance weighting (our choice, documented in
docs/REPRODUCTIONS.md); the layer-wise schedule and the label-free setting follow the paper.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.types import OptimizerLRScheduler
from torch import nn

from kd_lightning.config.run_spec import RunSpec
from kd_lightning.config.specs import AmalgamationSpec, MultiTaskTeacherSpec, parse, spec_dict
from kd_lightning.data.base import TensorDataModule
from kd_lightning.data.batch import Batch
from kd_lightning.data.fingerprint import data_key
from kd_lightning.engine.fitting import quiet_trainer
from kd_lightning.errors import ConfigError, safe_name
from kd_lightning.models.multitask import (
    MultiTaskNet,
    check_tasks,
    load_multitask,
    save_multitask,
    task_labels,
)
from kd_lightning.plain import Plain, plain_list, plain_map, plain_num, plain_str
from kd_lightning.runners import RunContext, register_runner
from kd_lightning.teachers.fit_once import fit_once, keyed_path
from kd_lightning.tensors import add_all

log = logging.getLogger(__name__)


# --- Lightning modules of the three kinds of training -------------------------------------------
class _Stage(pl.LightningModule):
    def __init__(self, params: list[nn.Parameter], lr: float, weight_decay: float = 0.0):
        super().__init__()
        self._params, self.lr, self.weight_decay = params, lr, weight_decay

    def configure_optimizers(self) -> OptimizerLRScheduler:
        opt = torch.optim.Adam(self._params, lr=self.lr, weight_decay=self.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        return {
            "optimizer": opt,
            "lr_scheduler": {
                "scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps),
                "interval": "step",
            },
        }


class SupervisedMultiTask(_Stage):
    """Fits a teacher with labels: the sum of its tasks' cross-entropies."""

    def __init__(self, model: MultiTaskNet, lr: float, weight_decay: float = 0.0):
        super().__init__(list(model.parameters()), lr, weight_decay)
        self.model = model

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        out = self.model(x)
        return add_all(F.cross_entropy(out[t], task_labels(t, y)) for t in out)


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation gate: a per-sample weight in (0, 1) for each channel of a feature map.

    Hand-written: torchvision's SqueezeExcitation is 2-D only; the student's blocks may be 1-D."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(4, channels // reduction)  # our choice
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc(s.flatten(2).mean(2)))
        return s * gate.view(*gate.shape, *[1] * (s.dim() - 2))


class BlockStage(_Stage):
    """Student block k against the chosen teachers' block k, through one 1×1 projection per teacher.

    Label-free: only `x` of each batch is used. Earlier student blocks are frozen (eval mode).
    With `tasks` (teacher → its chosen tasks; `block_stage: entangled`), each teacher also gets a channel
    attention before its projection, and the projected features run through the teacher's remaining
    blocks and chosen heads, whose outputs must match the teacher's own (KL at `temperature`)."""

    def __init__(
        self,
        student: MultiTaskNet,
        k: int,
        teachers: Mapping[str, MultiTaskNet],
        channel_weights: Mapping[str, torch.Tensor],
        lr: float,
        tasks: Mapping[str, Sequence[str]] | None = None,
        temperature: float = 4.0,
    ):
        conv = nn.Conv1d if isinstance(student.conv(0), nn.Conv1d) else nn.Conv2d
        c_s = student.conv(k).out_channels
        projections = nn.ModuleDict({n: conv(c_s, t.conv(k).out_channels, 1) for n, t in teachers.items()})
        attention = nn.ModuleDict({n: ChannelAttention(c_s) for n in teachers} if tasks else {})
        super().__init__(
            [*student.blocks[k].parameters(), *projections.parameters(), *attention.parameters()], lr
        )
        self.student, self.k, self.projections, self.attention = student, k, projections, attention
        self.tasks, self.temperature = dict(tasks or {}), temperature
        self.teachers: dict[str, MultiTaskNet]
        object.__setattr__(self, "teachers", dict(teachers))  # frozen, not submodules
        for n, w in channel_weights.items():
            self.register_buffer(f"w_{n}", w.view(1, -1, *[1] * (student.conv(0).weight.dim() - 2)))

    def on_train_epoch_start(self) -> None:
        for block in self.student.blocks[: self.k]:
            block.eval()

    def _through_teacher(
        self, teacher: MultiTaskNet, z: torch.Tensor, tasks: Sequence[str]
    ) -> list[torch.Tensor]:
        for block in teacher.blocks[self.k + 1 :]:
            z = block(z)
        z = z.flatten(1)
        return [teacher.heads[t](z) for t in tasks]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, T = batch[0], self.temperature
        with torch.no_grad():
            inp = self.student.trunk(x, self.k)
        s = self.student.blocks[self.k](inp)
        loss = x.new_zeros(())
        for n, teacher in self.teachers.items():
            with torch.no_grad():
                t = teacher.trunk(x, self.k + 1)
            p = self.projections[n](self.attention[n](s) if n in self.attention else s)
            if p.shape[2:] != t.shape[2:]:
                p = F.interpolate(p, size=t.shape[2:])
            loss = loss + (getattr(self, f"w_{n}") * (p - t) ** 2).mean()
            if n in self.tasks:  # entangled: the teacher's own later layers run on the student's features
                with torch.no_grad():
                    targets = self._through_teacher(teacher, t, self.tasks[n])
                for out, target in zip(
                    self._through_teacher(teacher, p, self.tasks[n]), targets, strict=True
                ):
                    loss = loss + F.kl_div(
                        F.log_softmax(out / T, 1),
                        F.log_softmax(target / T, 1),
                        reduction="batchmean",
                        log_target=True,
                    ) * (T * T)
        self.log("amalgamation/block_loss", loss, on_step=False, on_epoch=True)
        return loss


class HeadStage(_Stage):
    """The student's heads learn the chosen tasks from the teachers' soft outputs (Hinton KD, no labels).

    Trunk frozen; with `whole=True` (the optional last stage, `finetune_epochs`) every student weight trains."""

    def __init__(
        self,
        student: MultiTaskNet,
        sources: Mapping[str, list[MultiTaskNet]],
        temperature: float,
        lr: float,
        whole: bool = False,
    ):
        super().__init__(list((student if whole else student.heads).parameters()), lr)
        self.student, self.temperature, self.whole = student, temperature, whole
        self.sources: dict[str, list[MultiTaskNet]]  # not submodules: the teachers stay frozen
        object.__setattr__(self, "sources", dict(sources))

    def on_train_epoch_start(self) -> None:
        if not self.whole:
            self.student.blocks.eval()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, T = batch[0], self.temperature
        with torch.set_grad_enabled(self.whole):
            z = self.student.trunk(x).flatten(1)
        loss = x.new_zeros(())
        for task, teachers in self.sources.items():
            with torch.no_grad():
                target = torch.stack([t(x)[task] for t in teachers]).mean(0)
            s = self.student.heads[task](z)
            loss = loss + F.kl_div(
                F.log_softmax(s / T, 1), F.log_softmax(target / T, 1), reduction="batchmean", log_target=True
            ) * (T * T)
        self.log("amalgamation/head_loss", loss, on_step=False, on_epoch=True)
        return loss


# --- evaluation and filtering --------------------------------------------------------------------
@torch.no_grad()
def task_accuracy(
    model: MultiTaskNet, dm: TensorDataModule, tasks: Sequence[str], split: str = "test"
) -> dict[str, float]:
    model.eval()
    device = next(model.parameters()).device
    correct = dict.fromkeys(tasks, 0)
    n = 0
    for raw in dm.iter_split(split):
        batch = dm.prepare_batch(raw._replace(x=raw.x.to(device)), train=False)
        out = model(batch.x)
        y = batch.y.to(device)
        for t in tasks:
            correct[t] += int((out[t].argmax(1) == task_labels(t, y)).sum())
        n += len(y)
    return {t: correct[t] / max(1, n) for t in tasks}


def taylor_channel_weights(
    teacher: MultiTaskNet, k: int, tasks: Sequence[str], batches: Iterable[torch.Tensor]
) -> torch.Tensor:
    """Per-channel importance of block k's output for `tasks` (label-free: CE to the teacher's own
    predictions), |t · ∂ℓ/∂t| averaged over samples and positions, normalised to mean 1.

    `batches`: the (normalised) training inputs, batch by batch."""
    teacher.eval()
    per_batch = []
    for xb in batches:
        t = teacher.trunk(xb, k + 1).detach().requires_grad_(True)
        z = t
        for block in teacher.blocks[k + 1 :]:
            z = block(z)
        z = z.flatten(1)
        logits = [teacher.heads[task](z) for task in tasks]
        loss = add_all(F.cross_entropy(out, out.argmax(1)) for out in logits)
        (grad,) = torch.autograd.grad(loss, t)
        imp = (grad * t).abs().transpose(0, 1).flatten(1).sum(1).detach()
        per_batch.append(imp)
    total = add_all(per_batch)
    return total / total.mean().clamp_min(1e-12)


# --- the run -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AmalgamationKeys(AmalgamationSpec):
    """`amalgamation.*`, the settings runner=amalgamation declares (`register_runner(keys=...)`), with the
    checks that span keys."""

    __missing__ = (
        "runner=amalgamation needs an `amalgamation:` block (tasks, teachers, student); see experiment=ye2019"
    )

    def check(self, where: str) -> None:
        check_amalgamation(self)


def check_amalgamation_cfg(cfg: Mapping[str, Plain] | None) -> AmalgamationSpec:
    """`amalgamation.*` parsed, with the checks that span keys: task names, coverage, block counts."""
    if not cfg:
        raise ConfigError(AmalgamationKeys.__missing__)
    return parse(AmalgamationKeys, cfg, "amalgamation")


def check_amalgamation(a: AmalgamationSpec) -> None:
    check_tasks("amalgamation.tasks", a.tasks)
    if not a.teachers:
        raise ConfigError(
            "amalgamation.teachers must map teacher names to {tasks, channels, kernel_size, fit}"
        )
    for name, t in a.teachers.items():
        safe_name(f"amalgamation.teachers.{name}: the teacher name", name)  # it names the cache file
        check_tasks(f"amalgamation.teachers.{name}.tasks", t.tasks)
    held = {t for v in a.teachers.values() for t in v.tasks}
    orphan = [t for t in a.tasks if t not in held]
    if orphan:
        raise ConfigError(
            f"amalgamation.tasks {orphan} are held by no teacher; the teachers hold {sorted(held)}"
        )
    if a.block_epochs and not a.head_epochs:
        raise ConfigError(
            "amalgamation.head_epochs=0 with block_epochs>0 leaves the student's heads untrained after its blocks"
        )
    if not (a.head_epochs or a.finetune_epochs):
        raise ConfigError(
            "amalgamation: head_epochs and finetune_epochs are both 0, so the student's heads never train; "
            "set head_epochs (layer-wise schedule) or finetune_epochs (block_epochs=0 head_epochs=0: "
            "end-to-end KD only)"
        )
    if a.block_stage == "entangled" and not a.block_epochs:
        raise ConfigError(
            "amalgamation.block_stage=entangled changes the layer-wise block stage, which block_epochs=0 skips; "
            "set block_epochs > 0 or leave block_stage=projection"
        )
    depths = {n: len(v.channels) for n, v in a.teachers.items()}
    if not a.student.channels or any(d != len(a.student.channels) for d in depths.values()):
        raise ConfigError(
            f"amalgamation.student.channels has {len(a.student.channels)} blocks; layer-wise amalgamation needs "
            f"as many blocks as every teacher ({depths})"
        )


def fit_or_load_teacher(
    name: str,
    spec: MultiTaskTeacherSpec,
    dm: TensorDataModule,
    data_cfg: Mapping[str, Plain],
    cache_dir: str | Path,
    accelerator: str,
) -> tuple[MultiTaskNet, Path]:
    key = {
        "teacher": spec_dict(spec),
        "data": data_key(data_cfg, dm.content_fingerprint()),
        "order": "fit.seed",
    }
    path = keyed_path(Path(cache_dir) / "teachers" / f"{dm.name}-multitask", name, key)

    def fit() -> None:
        rng = torch.random.get_rng_state()
        pl.seed_everything(spec.fit.seed, verbose=False)
        model = MultiTaskNet(dm.input_shape, spec.tasks, spec.channels, spec.kernel_size)
        t0 = time.perf_counter()
        quiet_trainer(spec.fit.max_epochs, accelerator).fit(  # the fit's own seed orders its batches
            SupervisedMultiTask(model, spec.fit.lr, spec.fit.weight_decay),
            datamodule=dm.reshuffled(spec.fit.seed),
        )
        acc = task_accuracy(model, dm, spec.tasks)
        save_multitask(
            model, path, dm.input_shape, {"test_acc": acc, "fit_seconds": time.perf_counter() - t0}
        )
        torch.random.set_rng_state(rng)
        log.info("fitted multi-task teacher %s %s → %s", name, acc, path)

    model = load_multitask(fit_once(path, fit))
    model.requires_grad_(False)
    return model.eval(), path


def run_amalgamation(a: AmalgamationSpec, spec: RunSpec, dm: TensorDataModule, out: Path) -> dict[str, Plain]:
    """The whole method; returns the entries of results.json (student's and teachers' task accuracies)."""
    accelerator = spec.trainer.fit_accelerator
    teachers, paths = {}, {}
    for name, member in a.teachers.items():
        # teacher variance: amalgamation.fit_seed shifts every teacher's fit seed (each fit cached apart)
        member = dataclasses.replace(
            member, fit=dataclasses.replace(member.fit, seed=member.fit.seed + a.fit_seed)
        )
        teachers[name], paths[name] = fit_or_load_teacher(
            name, member, dm, spec.data.config, spec.paths.cache_dir, accelerator
        )
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    student = MultiTaskNet(dm.input_shape, a.tasks, a.student.channels, a.student.kernel_size)
    t0 = time.perf_counter()
    train_stages(a, student, teachers, dm, accelerator)
    fit_seconds = time.perf_counter() - t0
    student_acc = task_accuracy(student, dm, a.tasks)
    teacher_acc = {n: task_accuracy(teachers[n], dm, a.teachers[n].tasks) for n in teachers}
    save_multitask(student, out / "student.pt", dm.input_shape, {"task_acc": student_acc, "seed": spec.seed})
    return {
        "test_acc": sum(student_acc.values()) / len(student_acc),
        "task_acc": student_acc,
        "teacher_task_acc": teacher_acc,
        "teacher_test_acc": {
            f"{n}:{t}": acc for n, per in teacher_acc.items() for t, acc in per.items() if t in a.tasks
        },
        "teacher_checkpoints": {n: str(p) for n, p in paths.items()},
        "fit_seconds": fit_seconds,
        "student_path": str(out / "student.pt"),
        "tasks": a.tasks,
        "teacher_fit_seed": a.fit_seed,
        "val_acc": sum(task_accuracy(student, dm, a.tasks, "val").values()) / len(a.tasks),
    }


def train_stages(
    a: AmalgamationSpec,
    student: MultiTaskNet,
    teachers: Mapping[str, MultiTaskNet],
    dm: TensorDataModule,
    accelerator: str,
) -> None:
    """The student's stages: each block against the teachers' (their channels weighed by Taylor importance
    or alike), the heads, then the whole student fine-tuned, each stage skipped at 0 epochs."""
    # the teachers that hold a chosen task, and which of the chosen tasks each holds
    relevant = {n: [t for t in a.tasks if t in a.teachers[n].tasks] for n in teachers}
    relevant = {n: ts for n, ts in relevant.items() if ts}

    def train_inputs() -> Iterable[torch.Tensor]:
        for raw in dm.iter_split("train"):
            yield dm.prepare_batch(raw, train=False).x

    for k in range(len(student.blocks) if a.block_epochs else 0):
        weights = {
            n: taylor_channel_weights(teachers[n], k, ts, train_inputs())
            if a.filter == "taylor"
            else torch.ones(teachers[n].conv(k).out_channels)
            for n, ts in relevant.items()
        }
        stage = BlockStage(
            student,
            k,
            {n: teachers[n] for n in relevant},
            weights,
            a.lr,
            tasks=relevant if a.block_stage == "entangled" else None,
            temperature=a.temperature,
        )
        quiet_trainer(a.block_epochs, accelerator).fit(stage, datamodule=dm)
        log.info("amalgamation: block %d of %d trained", k + 1, len(student.blocks))
    sources = {t: [teachers[n] for n, ts in relevant.items() if t in ts] for t in a.tasks}
    if a.head_epochs:
        quiet_trainer(a.head_epochs, accelerator).fit(
            HeadStage(student, sources, a.temperature, a.lr), datamodule=dm
        )
    if a.finetune_epochs:
        # our choice: a third of the rate to fine-tune trained blocks; the full rate when nothing came before
        # (block_epochs=0 head_epochs=0: plain end-to-end KD from the teachers' soft outputs)
        lr = a.lr / 3 if a.block_epochs or a.head_epochs else a.lr
        whole = HeadStage(student, sources, a.temperature, lr, whole=True)
        quiet_trainer(a.finetune_epochs, accelerator).fit(whole, datamodule=dm)


def print_task_table(results: Mapping[str, Plain]) -> None:
    """Student vs each teacher on every chosen task (test accuracy, %)."""
    tasks = [plain_str(t, "tasks") for t in plain_list(results.get("tasks"), "tasks")]
    student = plain_map(results.get("task_acc"), "task_acc")
    print("\n| model | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks))
    print(
        "| student (no labels) | "
        + " | ".join(f"{100 * plain_num(student.get(t), f'task_acc.{t}'):.2f}" for t in tasks)
        + " |"
    )
    for n, accs in plain_map(results.get("teacher_task_acc"), "teacher_task_acc").items():
        per = plain_map(accs, f"teacher_task_acc.{n}")
        cells = [
            f"{100 * plain_num(per[t], f'teacher_task_acc.{n}.{t}'):.2f}" if t in per else "—" for t in tasks
        ]
        print(f"| teacher {n} | " + " | ".join(cells) + " |")


@register_runner("amalgamation", summary=print_task_table, keys=AmalgamationKeys)
def run_amalgamation_job(ctx: RunContext) -> None:
    """runner=amalgamation (experiment=ye2019): its own training loop, stage by stage; no labels used."""

    spec = ctx.spec
    a = ctx.keys_as(AmalgamationKeys)
    unused = {  # settings of the generic runner that this one would silently ignore
        "baseline=true": spec.settings.baseline,
        "evaluate.metrics/corruptions": spec.evaluation.active,
        "perf.compile/channels_last": spec.perf.compile is True or spec.perf.channels_last,
        "teachers.members": bool(spec.teachers.members),
        "distill.terms": bool(spec.distill.terms),
    }
    if any(unused.values()):
        raise ConfigError(
            f"runner=amalgamation does not use {', '.join(k for k, v in unused.items() if v)}: its teachers, "
            "student and schedule are amalgamation.*; drop those settings (or use runner=distill)"
        )
    if spec.settings.dry_run:
        ctx.results["status"] = "dry_run"
        return
    ctx.results.update(run_amalgamation(a, spec, ctx.dm, ctx.out))
