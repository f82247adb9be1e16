"""One run, in stages: config → data → (runner: teachers → module → fit → test → report and export).

`run(cfg)` owns what every run shares: the typed top-level settings, the output folder, resume=auto,
results.json (written also on failure) and the summary. What happens once the data is ready is the
runner's (`runner: distill` here; `runner: amalgamation` in kd_lightning.amalgamation). Each stage
returns a typed object, so a stage can be tested, replaced or reused alone.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kd_lightning import (
    amalgamation,  # noqa: F401  (registers runner=amalgamation)
    run_folder,
)
from kd_lightning.build import (
    build_module,
    build_teacher_ensemble,
    instantiate_datamodule,
    model_spec,
    resolve_pretrained_models,
    to_dict,
)
from kd_lightning.data.base import TensorDataModule
from kd_lightning.data.fingerprint import note_changes
from kd_lightning.distributed import leave_process_group, pin_ddp_children_to_job
from kd_lightning.errors import ConfigError, as_int
from kd_lightning.evaluation import robustness_summary
from kd_lightning.evaluation.run_eval import check_eval_cfg, evaluate_and_write
from kd_lightning.fitting import fit_accelerator, fit_supervised
from kd_lightning.models import save_model
from kd_lightning.module import DistillationModule
from kd_lightning.prestage import run_pre_stages
from kd_lightning.results import run_labels, write_json_atomic
from kd_lightning.resume import (
    check_resume,
    config_hash,
    interruption,
    newest_checkpoint,
    raise_on_sigterm,
    resume_command,
    resume_mode,
    sigterm_to_lightning,
)
from kd_lightning.runners import RunContext, get_runner, register_runner
from kd_lightning.specs import EvalSpec, items, mapping, parse, seed_field
from kd_lightning.summary import print_summary
from kd_lightning.teachers import TeacherEnsemble
from kd_lightning.trainers import build_trainer, evaluation_trainer, finish_loggers, keep_metrics_until

log = logging.getLogger("kd_lightning")


@dataclass(frozen=True)
class RunSettings:
    """The top-level keys of conf/train.yaml that no group owns."""

    seed: int = seed_field()
    runner: str = "distill"
    baseline: bool = False
    test_each_epoch: bool = False
    dry_run: bool = False
    print_summary: bool = True
    print_config: bool = False
    resume: str | None = None
    resume_accept: list[str] = items()
    overwrite: bool = False
    method_defaults: dict[str, Any] = mapping()

    def check(self, where: str) -> None:
        r = self.resume
        if r not in (None, "auto") and not Path(r).is_file():
            raise ConfigError(f"resume must be null, 'auto' or an existing checkpoint file, got {r!r}")


def check_config(cfg: DictConfig) -> RunSettings:
    """Stage 0: every value set and every interpolation resolvable, the top-level keys typed."""
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        missing = sorted(OmegaConf.missing_keys(plain))
        if not missing:
            OmegaConf.to_container(plain, resolve=True)
    except OmegaConfBaseException as e:  # an interpolation that does not resolve
        raise ConfigError(f"{e.full_key}: {str(e).splitlines()[0]}") from None
    if missing:
        raise ConfigError(
            f"{missing[0]} must be set: it has no default (add {missing[0]}=<value> to the command line)"
            + (f"; also unset: {', '.join(missing[1:])}" if len(missing) > 1 else "")
        )
    names = {f.name for f in fields(RunSettings)}
    top = {k: cfg.get(k) for k in names if k in cfg}
    top = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in top.items()}
    settings = parse(RunSettings, top, "config")
    as_int("trainer.max_epochs", cfg.trainer.get("max_epochs"), 1)
    check_accelerator(cfg)
    return settings


def check_accelerator(cfg: DictConfig) -> None:
    """A GPU trainer on a machine without one fails here, in one line, not in Lightning's device setup."""
    import torch

    accelerator = str(cfg.trainer.get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        choice = HydraConfig.get().runtime.choices.get("trainer") if HydraConfig.initialized() else None
        raise ConfigError(
            f"trainer.accelerator={accelerator}"
            + (f" (trainer={choice})" if choice else "")
            + " but this machine has no CUDA GPU (torch.cuda.is_available() is False). Use trainer=auto or "
            "trainer=cpu on one process, trainer=ddp_cpu for several, or KD_ACCELERATOR=cpu with trainer=multinode"
        )


def stage_data(cfg: DictConfig, seed: int) -> TensorDataModule:
    """Stage 1: the datamodule, set up (splits, normalisation); its shuffles follow the run's seed."""
    dm = instantiate_datamodule(cfg.data)
    dm.shuffle_seed = seed
    dm.prepare_data()
    dm.setup("fit")
    log.info("data %s", dm.describe())
    listings = dm.content_listings()
    if listings and _is_rank_zero():  # data read from disk: say so when it changed since the last run
        note_changes(dm.name, listings, cfg.paths.cache_dir)
    return dm


def write_resolved_config(cfg: DictConfig, out: Path) -> None:
    """config.resolved.yaml: the run's config with every interpolation resolved (kd-eval rebuilds from it)."""
    if _is_rank_zero():
        plain = {k: v for k, v in cfg.items() if k != "hydra"}  # present when composed by the API
        text = OmegaConf.to_yaml(
            OmegaConf.create(OmegaConf.to_container(OmegaConf.create(plain), resolve=True))
        )
        (out / "config.resolved.yaml").write_text(text)


def resume_path(cfg: DictConfig, out: Path) -> str | None:
    """resume=auto: the run folder's newest checkpoint when there is one (a fresh start otherwise)."""
    resume = resume_mode(cfg)
    if resume == "auto":
        last = newest_checkpoint(out)
        return str(last) if last is not None else None
    return resume


def checkpoint_epoch(path: str) -> int:
    """The epoch a Lightning checkpoint was saved in (memory-mapped: the weights are not read)."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])


def run(cfg: DictConfig) -> dict[str, Any]:
    """One experiment; returns the results dict that it also writes to results.json.

    The run owns its folder while it runs (kd_lightning.run_folder): a second run into it stops at once,
    and a folder that holds earlier work is continued only with resume=auto or replaced only with
    overwrite=true. results.json says `running` (start, host, pid, the config's hash) from the start.
    With resume=auto a finished run (results.json `ok` for this same config hash) is not repeated, and an
    unfinished one continues from its last checkpoint: re-launching a sweep only redoes what is missing. A
    config that changed what the run computes is refused first (kd_lightning.resume), before anything is
    written.
    """
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    owner = _is_rank_zero()
    if owner:  # the other ranks of a DDP run exist only while rank 0 owns the folder
        run_folder.claim(out)
    try:
        return _run_in_folder(cfg, out, owner)
    finally:
        if owner:
            run_folder.release(out)


def _run_in_folder(cfg: DictConfig, out: Path, owner: bool) -> dict[str, Any]:
    accepted: list[str] = []
    digest = config_hash(cfg)
    if resume_mode(cfg) == "auto":
        accepted = check_resume(cfg, out)
        if accepted:
            log.info("resume=auto: continuing %s with accepted changes: %s", out, "; ".join(accepted))
        done = (run_folder.previous_results(out) or {}) if owner else {}
        same = done.get("config_hash") == digest if "config_hash" in done else not accepted
        if done.get("status") == "ok" and same:
            log.info("resume=auto: %s already finished with this config, not repeating it", out)
            return done
    elif owner:
        run_folder.refuse_to_replace(out, resume_mode(cfg), bool(cfg.get("overwrite")))
    results: dict[str, Any] = {
        "status": "running",
        "seed": cfg.get("seed"),
        **run_labels(cfg),
        "output_dir": str(out),
        "config_hash": digest,
        **{f"run_{k}": v for k, v in run_folder.owner_record().items()},
    }
    if accepted:
        results["resume_accepted"] = accepted
    if owner:
        write_json_atomic(out / "results.json", results)
    runner = None
    previous_sigterm = raise_on_sigterm()
    try:
        settings = check_config(cfg)
        runner = get_runner(settings.runner)
        pl.seed_everything(settings.seed, workers=True)
        dm = stage_data(cfg, settings.seed)
        resolve_pretrained_models(cfg)
        write_resolved_config(cfg, out)
        runner.run(RunContext(cfg, dm, out, results))
        if results["status"] == "running":
            results["status"] = "ok"
    except ConfigError as e:
        results.update(status="config_error", error=str(e))
        raise
    except BaseException as e:
        stop = interruption(e)
        if stop is None:
            results.update(status="failed", error=f"{type(e).__name__}: {e}")
            raise
        last = newest_checkpoint(out)
        results.update(
            status="interrupted",
            error=f"interrupted by {stop}",
            last_checkpoint=str(last) if last else None,
            resume_command=resume_command(out),
        )
        raise stop from None
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if owner:
            results["run_ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_json_atomic(out / "results.json", results)
    if cfg.get("print_summary", True) and owner and runner is not None:
        if results["status"] == "dry_run":
            print(results.get("dry_run_summary") or f"dry run: built and checked; nothing trained ({out})")
        elif runner.summary is not None:
            runner.summary(results)
    return results


# --- runner=distill: the generic one ---------------------------------------------------------------
@dataclass(frozen=True)
class Built:
    """Stages 2-3: everything checked and built, nothing trained yet."""

    teachers: TeacherEnsemble | None
    module: DistillationModule
    trainer: pl.Trainer
    evaluation: EvalSpec


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
    pre_stage: dict[str, Any]  # what the methods' pre-stages trained (kd_lightning.prestage); {} if none


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


def stage_build(ctx: RunContext) -> Built:
    cfg, dm = ctx.cfg, ctx.dm
    if cfg.get("amalgamation"):
        raise ConfigError(
            "amalgamation is set but runner=distill: add runner=amalgamation (experiment=ye2019 does)"
        )
    teachers = build_teacher_ensemble(cfg, dm, str(ctx.results.get("data") or dm.name))
    pl.seed_everything(int(cfg.seed), workers=True)
    module = build_module(cfg, dm, teachers)
    evaluation = check_eval_cfg(to_dict(cfg.get("evaluate")), dm.input_shape)
    dm.test_each_epoch = bool(cfg.get("test_each_epoch"))
    return Built(teachers, module, build_trainer(cfg, validation="val" in dm.val_roles()), evaluation)


def stage_fit(ctx: RunContext, built: Built) -> Fitted:
    trainer = built.trainer
    ckpt = resume_path(ctx.cfg, ctx.out)
    pin_ddp_children_to_job(ctx.cfg, ctx.out)
    if ckpt is not None:
        keep_metrics_until(trainer, checkpoint_epoch(ckpt))
    t0 = time.perf_counter()
    # a method's pre-stage (FT's paraphraser) trains before the fit; a resumed run has it in the checkpoint
    pre_stage = run_pre_stages(built.module, ctx.dm, fit_accelerator(ctx.cfg)) if ckpt is None else {}
    with sigterm_to_lightning():
        trainer.fit(built.module, datamodule=ctx.dm, ckpt_path=ckpt)
    seconds = time.perf_counter() - t0
    if trainer.interrupted:
        raise KeyboardInterrupt("training was interrupted")
    cb = trainer.checkpoint_callback
    best = cb.best_model_path if cb is not None else ""
    val = (
        float(cb.best_model_score) if best and cb.best_model_score is not None else _last(trainer, "val/acc")
    )
    tests_here = True
    if trainer.world_size > 1:
        # Rank 0 tests alone (each test sample once) and writes; the other ranks are done. The group
        # goes, so that torchmetrics does not wait for ranks that have left.
        leave_process_group()
        tests_here = trainer.is_global_zero
    outputs = built.module.teacher_outputs
    files = outputs.files() if outputs is not None else []
    return Fitted(
        val, best or None, seconds, ckpt, tests_here, built.module.teacher_forward_by_rank, files, pre_stage
    )


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


def stage_report(ctx: RunContext, built: Built, tested: Tested) -> dict[str, Any]:
    """Stage 6: evaluation beyond accuracy, the student-alone baseline, the exported student."""
    cfg, dm, out = ctx.cfg, ctx.dm, ctx.out
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
    if cfg.get("baseline"):
        _, results["baseline_test_acc"] = fit_supervised(
            model_spec(cfg.student),
            dm,
            int(cfg.seed),
            int(cfg.trainer.max_epochs),
            built.module.optim,
            fit_accelerator(cfg),
        )
    results["student_path"] = str(
        save_model(
            built.module.student,
            out / "student.pt",
            model_spec(cfg.student),
            dm.num_classes,
            dm.input_shape,
            meta={"test_acc": tested.test_acc, "seed": int(cfg.seed)},
        )
    )
    return results


@register_runner("distill", summary=print_summary)
def run_distillation(ctx: RunContext) -> None:
    """Student + frozen teachers + objective, fitted by the configured Lightning Trainer."""
    built = stage_build(ctx)
    ctx.results["teacher_checkpoints"] = built.teachers.checkpoints if built.teachers else {}
    if ctx.cfg.get("dry_run"):
        ctx.results.update(status="dry_run", dry_run_summary=dry_run_summary(ctx, built))
        return
    try:
        fitted = stage_fit(ctx, built)
        ctx.results.update(
            resumed_from=fitted.resumed_from,
            fit_seconds=fitted.fit_seconds,
            val_acc=fitted.val_acc,
            train_samples=ctx.dm.num_train,
            teacher_forward_samples=sum(fitted.teacher_forward_by_rank),
            teacher_forward_samples_by_rank=fitted.teacher_forward_by_rank,
            teacher_store_files=fitted.store_files,
            **fitted.pre_stage,
        )
        if not fitted.tests_here:
            return
        tested = stage_test(ctx, built, fitted)
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
    cfg, module, trainer = ctx.cfg, built.module, built.trainer
    n_params = sum(p.numel() for p in module.student.parameters())
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    student = model_spec(cfg.student).get("name")
    if built.teachers is None:
        teachers = "no teachers (the student learns from its labels alone)"
    else:
        parts = []
        for name in built.teachers.names:
            how = "not fitted yet: a real run fits it first" if name in built.teachers.unfitted else "loaded"
            parts.append(f"{name} ({built.teachers.checkpoints[name]}, {how})")
        teachers = f"{len(parts)} frozen teacher(s): " + "; ".join(parts)
    terms = ", ".join(f"{n} ({t.distance} on {t.student_tap})" for n, t in module.objective.terms.items())
    outputs = module.teacher_outputs
    store = f"; teacher outputs stored ({cfg.teacher_cache.mode})" if outputs is not None else ""
    return (
        f"dry run, nothing trained: data {ctx.dm.describe()}; student {student} with {n_params:,} "
        f"parameters ({n_trainable:,} trainable with the adapters); {teachers}; objective "
        f"CE×{module.objective.ce_weight:g}"
        + (f" + {terms}" if terms else "")
        + store
        + f"; {int(cfg.trainer.max_epochs)} epochs on {trainer.num_devices} {trainer.strategy.root_device.type}"
        f" device(s), precision {trainer.precision}; output {ctx.out}."
    )


def _last(trainer: pl.Trainer, key: str) -> float | None:
    v = trainer.callback_metrics.get(key)
    return float(v) if v is not None else None


def _is_rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
