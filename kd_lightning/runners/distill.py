"""runner=distill, the generic runner: teachers → module → fit → test → report and export, in stages that
each return a typed object (so a stage can be tested, replaced or reused alone)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from kd_lightning.config.run_spec import RunSpec
from kd_lightning.config.specs import EvalSpec, flatten
from kd_lightning.core.module import DistillationModule
from kd_lightning.engine.build import build_module, build_teacher_ensemble
from kd_lightning.engine.distributed import leave_process_group, pin_ddp_children_to_job
from kd_lightning.engine.fitting import fit_supervised
from kd_lightning.engine.preempt import PreemptionCheckpoint
from kd_lightning.engine.preempt import wanted as preemption_warned
from kd_lightning.engine.prestage import run_pre_stages
from kd_lightning.engine.resume import newest_checkpoint, resume_mode, sigterm_to_lightning
from kd_lightning.engine.sync_check import SyncCheck
from kd_lightning.engine.trainers import (
    RunProgress,
    build_trainer,
    evaluation_trainer,
    finish_loggers,
    keep_metrics_until,
    log_final_results,
)
from kd_lightning.errors import ConfigError
from kd_lightning.evaluation import robustness_summary
from kd_lightning.evaluation.run_eval import check_eval_cfg, evaluate_and_write
from kd_lightning.losses.registry import check_options
from kd_lightning.models import save_model
from kd_lightning.plain import Plain
from kd_lightning.runners.registry import RunContext, register_runner
from kd_lightning.runners.summary import print_summary
from kd_lightning.teachers.ensemble import TeacherEnsemble
from kd_lightning.teachers.feed import TeacherFeed
from kd_lightning.teachers.precompute import TeacherPrecompute

log = logging.getLogger("kd_lightning")


def resume_path(resume: str | None, out: Path) -> str | None:
    """resume=auto: the run folder's newest checkpoint when there is one (a fresh start otherwise)."""
    resume = resume_mode(resume)
    if resume == "auto":
        last = newest_checkpoint(out)
        return str(last) if last is not None else None
    return resume


def checkpoint_epoch(path: str) -> int:
    """The epoch a Lightning checkpoint was saved in (memory-mapped: the weights are not read)."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])


def check_term_options(spec: RunSpec) -> None:
    """Each distill term's options against its loss's constructor, a loss of your own included."""
    for name, term in spec.distill.terms.items():
        try:
            check_options(term.distance, term.options)
        except ConfigError as e:
            raise ConfigError(f"distill.terms.{name}: {e}") from None


@dataclass(frozen=True)
class Built:
    """Stages 2-3: everything checked and built, nothing trained yet."""

    teachers: TeacherEnsemble | None
    module: DistillationModule
    trainer: pl.Trainer
    evaluation: EvalSpec
    precompute: TeacherPrecompute | None  # fills the stores and counts the teachers' work (None: no teachers)
    progress: RunProgress  # results.json while the fit runs; the figures summed over a resumed run's attempts
    syncs: SyncCheck | None  # perf.check_syncs: the host reads of the training steps


@dataclass(frozen=True)
class Fitted:
    """Stage 4: the fit's outcome."""

    val_acc: float | None
    best_checkpoint: str | None
    fit_seconds: float
    resumed_from: str | None
    tests_here: bool  # False on DDP ranks other than 0: they are done after fitting
    teacher_forward_by_rank: list[int]  # training samples the teachers ran on, per rank (precompute + live)
    store_files: list[str]
    pre_stage: dict[
        str, Any
    ]  # what the methods' pre-stages trained (kd_lightning.engine.prestage); {} if none


@dataclass(frozen=True)
class Tested:
    """Stage 5: test accuracies of the student, each teacher and the teachers' ensemble."""

    test_acc: (
        float  # the checkpoint chosen by callbacks.model_checkpoint (val/acc; the last epoch without val)
    )
    last_test_acc: float  # the student as the fit left it: the last epoch
    teacher_test_acc: dict[str, float]
    teacher_ensemble_test_acc: float | None
    teacher_agreement: float | None


def _computed_samples(feed: TeacherFeed | None) -> Callable[[], int]:
    """How many samples the teachers have run on so far (0 without teachers), for the run's progress."""
    return (lambda: feed.computed_samples) if feed is not None else (lambda: 0)


def stage_build(ctx: RunContext) -> Built:
    spec, dm = ctx.spec, ctx.dm
    check_term_options(spec)  # before any teacher is fitted
    teachers = build_teacher_ensemble(spec, dm)
    pl.seed_everything(spec.seed, workers=True)
    module = build_module(spec, dm, teachers)
    evaluation = check_eval_cfg(spec.evaluation, dm.input_shape)
    precompute = TeacherPrecompute(module.feed) if module.feed is not None else None
    progress = RunProgress(
        ctx.results,
        ctx.out / "results.json",
        _computed_samples(module.feed),
    )
    syncs = SyncCheck() if spec.perf.check_syncs else None
    preempt = PreemptionCheckpoint(ctx.out) if preemption_warned() else None  # SLURM's warning: save, requeue
    own = [c for c in (precompute, progress, syncs, preempt) if c is not None]
    # the resolved config as hyperparameters: Lightning logs them to every tracker when the fit starts
    module.save_hyperparameters(flatten(spec.resolved, skip=("hydra", "paths")))
    trainer = build_trainer(spec, validation="val" in dm.val_roles(), callbacks=own)
    if trainer.num_devices > 1 and trainer.strategy.root_device.type == "cpu" and trainer.is_global_zero:
        log.info(
            "trainer.devices=%d on the CPU: DDP over %d CPU processes (gloo), each with data.batch_size=%d",
            trainer.num_devices, trainer.num_devices, dm.batch_size,
        )  # fmt: skip
    return Built(teachers, module, trainer, evaluation, precompute, progress, syncs)


def stage_fit(ctx: RunContext, built: Built) -> Fitted:
    trainer = built.trainer
    ckpt = resume_path(ctx.spec.settings.resume, ctx.out)
    pin_ddp_children_to_job(ctx.spec.trainer.options, ctx.spec.resolved, ctx.out)
    if ckpt is not None:
        epoch = checkpoint_epoch(ckpt)
        keep_metrics_until(trainer, epoch)
        built.progress.carry(ctx.earlier, epochs_kept=epoch + 1)
        log.info(
            "resuming %s from %s: %d of %d epochs done (attempt %d)",
            ctx.out, ckpt, epoch + 1, ctx.spec.trainer.max_epochs, built.progress.attempts,
        )  # fmt: skip
    t0 = time.perf_counter()
    # a method's pre-stage (FT's paraphraser) trains before the fit; a resumed run has it in the checkpoint
    pre_stage = run_pre_stages(built.module, ctx.dm, ctx.spec.trainer.fit_accelerator) if ckpt is None else {}
    with sigterm_to_lightning(), warnings.catch_warnings():
        if ckpt is not None:  # resuming in the run's own folder: its checkpoints are meant to be there
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        trainer.fit(built.module, datamodule=ctx.dm, ckpt_path=ckpt)
    seconds = time.perf_counter() - t0
    if trainer.interrupted:
        raise KeyboardInterrupt("training was interrupted")
    cb = trainer.checkpoint_callback
    best = cb.best_model_path if isinstance(cb, ModelCheckpoint) else ""
    score = cb.best_model_score if isinstance(cb, ModelCheckpoint) else None
    val = float(score) if best and score is not None else _last(trainer, "val/acc")
    tests_here = True
    if trainer.world_size > 1:
        # Rank 0 tests alone (each test sample once) and writes; the other ranks are done. The group
        # goes, so that torchmetrics does not wait for ranks that have left.
        leave_process_group()
        tests_here = trainer.is_global_zero
    outputs = built.module.teacher_outputs
    files = [f for f in outputs.files() if Path(f).exists()] if outputs is not None else []  # DDP's are gone
    by_rank = built.precompute.forward_by_rank if built.precompute is not None else [0] * trainer.world_size
    return Fitted(val, best or None, seconds, ckpt, tests_here, by_rank, files, pre_stage)


def stage_test(ctx: RunContext, built: Built, fitted: Fitted) -> Tested:
    module, teachers = built.module, built.teachers
    trainer = evaluation_trainer(built.trainer)
    # the last epoch first (the module holds it now), then the checkpoint callbacks.model_checkpoint chose;
    # without a validation split that checkpoint is the last epoch itself, tested once
    test = trainer.test(module, datamodule=ctx.dm, verbose=False)[0]
    last = float(test["test/acc"])
    if fitted.best_checkpoint and "val" in ctx.dm.val_roles():
        test = trainer.test(module, datamodule=ctx.dm, ckpt_path=fitted.best_checkpoint, verbose=False)[0]
    if teachers is None:
        return Tested(float(test["test/acc"]), last, {}, None, None)
    return Tested(
        float(test["test/acc"]),
        last,
        {n: float(test[f"test/teacher/{n}/acc"]) for n in teachers.names},
        float(test["test/teacher/ensemble/acc"]),
        float(test["test/agreement"]),
    )


def stage_report(ctx: RunContext, built: Built, tested: Tested) -> dict[str, Plain]:
    """Stage 6: evaluation beyond accuracy, the student-alone baseline, the exported student."""
    spec, dm, out = ctx.spec, ctx.dm, ctx.out
    results: dict[str, Any] = {}
    if built.evaluation.active:
        result = evaluate_and_write(
            built.module.student, built.teachers, dm, built.evaluation, out, device=built.module.device
        )
        summary = robustness_summary(result["robustness"])
        results.update(
            metrics=result["clean"],
            agreement=result.get("agreement", {}),
            robustness={m: s["mean"] for m, s in summary.items()},
        )
    if spec.settings.baseline:
        _, results["baseline_test_acc"] = fit_supervised(
            spec.student.arch,
            dm,
            spec.seed,
            spec.trainer.max_epochs,
            built.module.optim,
            spec.trainer.fit_accelerator,
        )
    results["student_path"] = str(
        save_model(
            built.module.student,
            out / "student.pt",
            spec.student.arch,
            dm.num_classes,
            dm.input_shape,
            meta={"test_acc": tested.test_acc, "seed": spec.seed},
        )
    )
    return results


@register_runner("distill", summary=print_summary)
def run_distillation(ctx: RunContext) -> None:
    """Student + frozen teachers + objective, fitted by the configured Lightning Trainer."""
    built = stage_build(ctx)
    ctx.results["teacher_checkpoints"] = built.teachers.checkpoints if built.teachers else {}
    if ctx.spec.settings.dry_run:
        ctx.results.update(status="dry_run", dry_run_summary=dry_run_summary(ctx, built))
        return
    try:
        fitted = stage_fit(ctx, built)
        ctx.results.update(
            resumed_from=fitted.resumed_from,
            **built.progress.totals(fitted.fit_seconds, sum(fitted.teacher_forward_by_rank)),
            val_acc=fitted.val_acc,
            train_samples=ctx.dm.num_train,
            teacher_forward_samples_by_rank=fitted.teacher_forward_by_rank,
            teacher_store_files=fitted.store_files,
            teacher_precompute_seconds=built.precompute.fill_seconds if built.precompute is not None else 0.0,
            **fitted.pre_stage,
        )
        if built.syncs is not None:
            ctx.results["sync_check"] = built.syncs.summary()
        if not fitted.tests_here:
            return
        tested = stage_test(ctx, built, fitted)
        finals = {"test_acc": tested.test_acc, "last_test_acc": tested.last_test_acc}
        log_final_results(
            built.trainer, {**finals, "teacher_ensemble_test_acc": tested.teacher_ensemble_test_acc}
        )
    finally:
        finish_loggers(built.trainer)
    ctx.results.update(
        test_acc=tested.test_acc,
        last_test_acc=tested.last_test_acc,
        best_checkpoint=fitted.best_checkpoint,
        teacher_test_acc=tested.teacher_test_acc,
    )
    curve = built.module.test_curve
    if curve:  # test_each_epoch: the papers' "best" accuracy, chosen on the test set itself
        best_epoch = max(range(len(curve)), key=curve.__getitem__)
        ctx.results.update(
            best_test_acc=curve[best_epoch],
            best_test_epoch=best_epoch,
            test_curve=curve,
            best_test_acc_selection="test set (max over epochs of the test accuracy; optimistic)",
        )
    if built.teachers is not None:
        ctx.results.update(
            teacher_ensemble_test_acc=tested.teacher_ensemble_test_acc,
            teacher_agreement=tested.teacher_agreement,
        )
    ctx.results.update(stage_report(ctx, built, tested))


def dry_run_summary(ctx: RunContext, built: Built) -> str:
    """One paragraph: what a real run of this config would train, on what, with which teachers."""
    spec, module, trainer = ctx.spec, built.module, built.trainer
    n_params = sum(p.numel() for p in module.student.parameters())
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    student = spec.student.name
    if built.teachers is None:
        teachers = "no teachers (the student learns from its labels alone)"
    else:
        parts = []
        for name in built.teachers.names:
            how = "not fitted yet: a real run fits it first" if name in built.teachers.unfitted else "loaded"
            parts.append(f"{name} ({built.teachers.checkpoints[name]}, {how})")
        teachers = f"{len(parts)} frozen teacher(s): " + "; ".join(parts)
    terms = ", ".join(f"{n} ({t.distance} on {t.student_tap})" for n, t in module.objective.term.items())
    outputs = module.teacher_outputs
    store = f"; teacher outputs stored ({spec.cache.mode})" if outputs is not None else ""
    return (
        f"dry run, nothing trained: data {ctx.dm.describe()}; student {student} with {n_params:,} "
        f"parameters ({n_trainable:,} trainable with the adapters); {teachers}; objective "
        f"CE×{module.objective.ce_weight:g}"
        + (f" + {terms}" if terms else "")
        + store
        + f"; {spec.trainer.max_epochs} epochs on {trainer.num_devices} {trainer.strategy.root_device.type}"
        f" device(s), precision {trainer.precision}; output {ctx.out}."
    )


def _last(trainer: pl.Trainer, key: str) -> float | None:
    v = trainer.callback_metrics.get(key)
    return float(v) if v is not None else None
