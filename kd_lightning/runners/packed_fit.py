"""The fit of a pack (kd_lightning.runners.packed): each job built as it would be alone, the students fused
(kd_lightning.core.packed), one Trainer; then each job tested and reported as the distill runner does."""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl

from kd_lightning.config.run_spec import RunSpec
from kd_lightning.core.module import DistillationModule
from kd_lightning.core.objective import tap_names
from kd_lightning.core.packed import PackedModule
from kd_lightning.engine.build import build_module, build_shared_feed, build_teacher_ensemble
from kd_lightning.engine.resume import sigterm_to_lightning
from kd_lightning.engine.trainers import RunProgress, build_pack_trainer
from kd_lightning.evaluation.run_eval import check_eval_cfg
from kd_lightning.runners.distill import Built, Tested, check_term_options, stage_report
from kd_lightning.runners.registry import RunContext
from kd_lightning.teachers.ensemble import TeacherEnsemble
from kd_lightning.teachers.precompute import TeacherPrecompute

log = logging.getLogger("kd_lightning")


@dataclasses.dataclass
class Job:
    """One job of a pack: its context, its teachers (a subset of the union's), its own module."""

    ctx: RunContext
    names: list[str]
    teachers: TeacherEnsemble | None
    module: DistillationModule
    teacher_taps: list[str]


def build_jobs(ctxs: Sequence[RunContext], teachers: TeacherEnsemble | None) -> list[Job]:
    """Each job's module as the job alone builds it: its seed set just before, its teachers, its adapters.
    The modules' own feeds run their teachers live (for the tests); the fit reads the union's feed."""
    jobs = []
    for ctx in ctxs:
        spec = ctx.spec
        names = [n for n in spec.teachers.selected if n in spec.teachers.members]
        mine = teachers.subset(names) if teachers is not None and names else None
        pl.seed_everything(spec.seed, workers=True)
        alone = dataclasses.replace(
            spec,
            cache=dataclasses.replace(spec.cache, mode="none"),
            perf=dataclasses.replace(spec.perf, compile=False),  # vmap runs the students' own forward
        )
        module = build_module(alone, ctx.dm, mine)
        taps = sorted({t for term in module.objective.term.values() for t in tap_names(term.teacher_tap)})
        if mine is not None:
            mine.configure_taps([])  # the union's taps record the features; these come back for the test
        jobs.append(Job(ctx, names, mine, module, taps))
    return jobs


def train_pack(ctxs: Sequence[RunContext], folder: Path, resume: str | None) -> None:
    """Build, fit, test and report every job of the pack; each ctx.results gets what a run alone records."""
    first, dm = ctxs[0].spec, ctxs[0].dm
    for ctx in ctxs:
        check_term_options(ctx.spec)
    union = [n for n in first.teachers.members if any(n in c.spec.teachers.selected for c in ctxs)]
    pool = dataclasses.replace(first, teachers=dataclasses.replace(first.teachers, use=union))
    teachers = build_teacher_ensemble(pool, dm) if union else None
    jobs = build_jobs(ctxs, teachers)
    taps = sorted({t for job in jobs if job.names for t in job.teacher_taps})
    reads = any(job.names and job.module.objective.uses_teachers for job in jobs)
    feed = None
    if teachers is not None and reads:
        feed = build_shared_feed(first, dm, teachers, taps, folder / ".kd" / "teacher_outputs")
    pack = PackedModule([j.module for j in jobs], feed, [j.names for j in jobs])
    precompute = TeacherPrecompute(feed) if feed is not None else None
    trainer = build_pack_trainer(first, folder, [precompute] if precompute is not None else [])
    last = folder / "checkpoints" / "last.ckpt"
    ckpt = str(last) if resume == "auto" and last.is_file() else None
    log.info("packed: %d jobs trained together (%s)", len(jobs), folder)
    t0 = time.perf_counter()
    with sigterm_to_lightning(), warnings.catch_warnings():
        if ckpt is not None:  # continuing in the pack's own folder: its checkpoint is meant to be there
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        trainer.fit(pack, datamodule=dm, ckpt_path=ckpt)
    seconds = time.perf_counter() - t0
    if trainer.interrupted:
        raise KeyboardInterrupt("training was interrupted")
    pack.unpack()
    samples = precompute.forward_by_rank if precompute is not None else [0]
    for k, job in enumerate(jobs):
        _finish_job(k, job, pack, trainer, seconds, samples, ckpt)


def keeps_best(spec: RunSpec) -> bool:
    """Whether a run alone would test a best epoch by val/acc (a checkpoint callback that monitors it)."""
    return any(
        c is not None
        and (c._target_ or "").endswith("ModelCheckpoint")
        and c.options.get("monitor") == "val/acc"
        for c in spec.callbacks.values()
    )


def _test_job(k: int, job: Job, pack: PackedModule, trainer: pl.Trainer) -> tuple[Tested, bool]:
    """Job k tested as the distill runner tests a run: the last epoch, then (when its callbacks keep one) its
    best epoch by val/acc, which its module then holds; and whether that best epoch was tested."""
    ctx, module = job.ctx, job.module
    if job.teachers is not None:
        job.teachers.configure_taps(job.teacher_taps)
    module.to(pack.device)
    scores = trainer.test(module, datamodule=ctx.dm, verbose=False)[0]
    last = float(scores["test/acc"])
    state = pack.best_state[k] if keeps_best(ctx.spec) else None
    best = state is not None and "val" in ctx.dm.val_roles()
    if best:  # the epoch callbacks.model_checkpoint would keep
        pack.students.unpack_into(k, module.student, state)
        scores = trainer.test(module, datamodule=ctx.dm, verbose=False)[0]
    names = job.teachers.names if job.teachers is not None else []
    tested = Tested(
        float(scores["test/acc"]),
        last,
        {n: float(scores[f"test/teacher/{n}/acc"]) for n in names if f"test/teacher/{n}/acc" in scores},
        float(scores["test/teacher/ensemble/acc"]) if "test/teacher/ensemble/acc" in scores else None,
        float(scores["test/agreement"]) if "test/agreement" in scores else None,
    )
    return tested, best


def _finish_job(
    k: int,
    job: Job,
    pack: PackedModule,
    trainer: pl.Trainer,
    seconds: float,
    samples: list[int],
    ckpt: str | None,
) -> None:
    """Job k's test (the last epoch, then its best epoch by val/acc) and report, into its results."""
    ctx, module = job.ctx, job.module
    ctx.results["teacher_checkpoints"] = job.teachers.checkpoints if job.teachers is not None else {}
    tested, best = _test_job(k, job, pack, trainer)
    curve = pack.val_curves[k]
    val = pack.best_acc[k] if best else (curve[-1] if curve else None)
    ctx.results.update(
        resumed_from=ckpt,
        fit_seconds=seconds,  # the whole pack's: its jobs trained at once
        val_acc=val,  # as a run alone reports it: the best epoch's when it keeps one, else the last's
        best_epoch=pack.best_epoch[k],
        val_curve=list(pack.val_curves[k]),
        train_samples=ctx.dm.num_train,
        teacher_forward_samples=sum(samples),  # the pack's: the union's teachers, once per batch
        test_acc=tested.test_acc,
        last_test_acc=tested.last_test_acc,
        best_checkpoint=None,  # the best epoch's weights are the pack's, exported as student.pt below
        teacher_test_acc=tested.teacher_test_acc,
        pack_checkpoint=str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"),
    )
    if job.teachers is not None:
        ctx.results.update(
            teacher_ensemble_test_acc=tested.teacher_ensemble_test_acc,
            teacher_agreement=tested.teacher_agreement,
        )
    evaluation = check_eval_cfg(ctx.spec.evaluation, ctx.dm.input_shape)
    built = Built(
        job.teachers,
        module,
        trainer,
        evaluation,
        None,
        RunProgress(ctx.results, ctx.out / "results.json"),
        None,
    )
    ctx.results.update(stage_report(ctx, built, tested))
