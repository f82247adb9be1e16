"""kd-train: the Hydra entry point. Compose → validate/build (before training) → fit → test → write.

Writes into the run's output dir: results.json (always, also on failure), student.pt (the student
alone: loads with `kd_lightning.models.load_model`, no teachers needed) and Lightning checkpoints.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar

from kd_lightning.config_files import check_config_dirs, config_dirs_from_argv
from kd_lightning.distributed import job_scope, leave_process_group, pin_ddp_children_to_job, torchrun_argv
from kd_lightning.errors import ConfigError, as_float, as_int, as_seed
from kd_lightning.evaluation import robustness_summary
from kd_lightning.evaluation.run_eval import check_eval_cfg, evaluate_and_write
from kd_lightning.models import save_model
from kd_lightning.module import DistillationModule
from kd_lightning.objective import active_terms
from kd_lightning.pipeline import (
    build_module,
    build_teacher_ensemble,
    fit_supervised,
    instantiate,
    instantiate_datamodule,
    model_spec,
    resolve_pretrained_models,
    to_dict,
)
from kd_lightning.resolvers import register_resolvers
from kd_lightning.results import read_results, write_json_atomic
from kd_lightning.summary import print_summary
from kd_lightning.teacher_cache import check_mode
from kd_lightning.teachers import TeacherEnsemble

log = logging.getLogger("kd_lightning")
register_resolvers()

GROUPS = ("data", "student", "teachers", "distill", "trainer", "optim", "experiment")


def group_choices(cfg: DictConfig) -> dict[str, Any]:
    """The config-group choices of this run (from Hydra when available, else the configs' `name` keys)."""
    if HydraConfig.initialized():
        chosen = HydraConfig.get().runtime.choices
        return {g: chosen.get(g) for g in GROUPS}
    return {g: (cfg.get(g) or {}).get("name") if isinstance(cfg.get(g), DictConfig) else None for g in GROUPS}


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


def teacher_set_label(cfg: DictConfig) -> str:
    """`cnn_a+cnn_b`: the teachers this run uses, in pool order of `teachers.use` ("none" without any)."""
    try:
        teachers = to_dict(cfg.get("teachers")) or {}
    except Exception:  # a broken interpolation is reported by validation; the label must not fail first
        return "unknown"
    members = list(teachers.get("members") or {})
    use = teachers.get("use")
    used = members if use is None else ([use] if isinstance(use, str) else use)
    return "+".join(str(u) for u in (used if isinstance(used, list) else []) if u in members) or "none"


def distance_label(cfg: DictConfig) -> str:
    terms = active_terms(to_dict(cfg.distill) or {})
    return "+".join(sorted({str(t.get("distance", "mse")) for t in terms.values()})) or "none"


def validate(cfg: DictConfig) -> None:
    """Checks of the top-level keys that no component owns (components check their own keys)."""
    as_seed("seed", cfg.seed)
    as_int("trainer.max_epochs", cfg.trainer.get("max_epochs"), 1)
    as_float("optim.lr", cfg.optim.get("lr"), 0.0, open_low=True)
    as_float("optim.weight_decay", cfg.optim.get("weight_decay", 0.0), 0.0)
    for key in ("baseline", "dry_run"):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(f"{key} must be true or false, got {cfg.get(key)!r}")
    check_mode(cfg.get("teacher_cache", "memory"))
    resume = cfg.get("resume")
    if resume not in (None, "auto") and not (isinstance(resume, str) and Path(resume).is_file()):
        raise ConfigError(f"resume must be null, 'auto' or an existing checkpoint file, got {resume!r}")


def write_resolved_config(cfg: DictConfig, out: Path) -> None:
    """config.resolved.yaml: the run's config with every interpolation resolved (kd-eval rebuilds from it)."""
    if _is_rank_zero():
        try:
            plain = {k: v for k, v in cfg.items() if k != "hydra"}  # present when composed by the API
            text = OmegaConf.to_yaml(
                OmegaConf.create(OmegaConf.to_container(OmegaConf.create(plain), resolve=True))
            )
        except Exception as e:  # a key that resolves only later is reported by its owner
            log.warning("config.resolved.yaml not written: %s", e)
            return
        (out / "config.resolved.yaml").write_text(text)


def resume_path(cfg: DictConfig, out: Path) -> str | None:
    """resume=auto: the run folder's last.ckpt when there is one (a fresh start otherwise)."""
    resume = cfg.get("resume")
    if resume == "auto":
        last = out / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    return resume


def run(cfg: DictConfig) -> dict[str, Any]:
    """One experiment; returns the results dict that it also writes to results.json.

    With resume=auto a finished run (results.json with status ok) is not repeated, and an interrupted
    one continues from its last checkpoint: re-launching a sweep only redoes what is missing.
    """
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "results.json"
    if cfg.get("resume") == "auto" and previous.is_file():
        done = read_results(previous)
        if done.get("status") == "ok":
            log.info("resume=auto: %s already finished, not repeating it", out)
            return done
    results: dict[str, Any] = {
        "status": "running",
        "seed": cfg.seed,
        **group_choices(cfg),
        "teacher_set": teacher_set_label(cfg),
        "distance": distance_label(cfg),
        "output_dir": str(out),
    }
    try:
        validate(cfg)
        pl.seed_everything(int(cfg.seed), workers=True)
        dm = instantiate_datamodule(cfg.data)
        dm.shuffle_seed = int(cfg.seed)
        dm.prepare_data()
        dm.setup("fit")
        log.info("data %s", dm.describe())
        resolve_pretrained_models(cfg)
        write_resolved_config(cfg, out)
        if cfg.get("amalgamation"):
            return run_amalgamation_job(cfg, dm, out, results)
        teachers = build_teacher_ensemble(cfg, dm, str(results.get("data") or dm.name))
        pl.seed_everything(int(cfg.seed), workers=True)
        module = build_module(cfg, dm, teachers)
        eval_cfg = check_eval_cfg(to_dict(cfg.get("evaluate")), dm.input_shape)
        trainer = build_trainer(cfg)
        results["teacher_checkpoints"] = teachers.checkpoints if teachers else {}
        if cfg.get("dry_run"):
            results["status"] = "dry_run"
            return results

        ckpt = resume_path(cfg, out)
        pin_ddp_children_to_job(cfg, out)
        results["resumed_from"] = ckpt
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        results["fit_seconds"] = time.perf_counter() - t0
        if trainer.interrupted:
            raise KeyboardInterrupt("training was interrupted")
        ckpt_cb = trainer.checkpoint_callback
        best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
        results["val_acc"] = (
            float(ckpt_cb.best_model_score)
            if best and ckpt_cb.best_model_score is not None
            else _last(trainer, "val/acc")
        )
        if trainer.world_size > 1:
            # Rank 0 tests alone (each test sample once) and writes; the other ranks are done. The group
            # goes, so that torchmetrics does not wait for ranks that have left.
            leave_process_group()
            if not trainer.is_global_zero:
                results["status"] = "ok"
                return results
        test = evaluation_trainer(trainer).test(module, datamodule=dm, ckpt_path=best or None, verbose=False)[
            0
        ]
        results["test_acc"] = float(test["test/acc"])
        results["best_checkpoint"] = best or None
        if teachers is not None:
            results["teacher_test_acc"] = {n: float(test[f"test/teacher/{n}/acc"]) for n in teachers.names}
            results["teacher_ensemble_test_acc"] = float(test["test/teacher/ensemble/acc"])
            results["teacher_agreement"] = float(test["test/agreement"])
        else:
            results["teacher_test_acc"] = {}
        if eval_cfg["metrics"]:
            results.update(evaluation_results(module, teachers, dm, eval_cfg, out))
        if cfg.get("baseline") and _is_rank_zero():
            fit_cfg = {"seed": int(cfg.seed), "max_epochs": int(cfg.trainer.max_epochs), **to_dict(cfg.optim)}
            _, results["baseline_test_acc"] = fit_supervised(
                model_spec(cfg.student), dm, fit_cfg, str(cfg.trainer.get("accelerator", "cpu"))
            )
        if trainer.is_global_zero:
            results["student_path"] = str(
                save_model(
                    module.student,
                    out / "student.pt",
                    model_spec(cfg.student),
                    dm.num_classes,
                    dm.input_shape,
                    meta={"test_acc": results["test_acc"], "seed": int(cfg.seed)},
                )
            )
        results["status"] = "ok"
    except ConfigError as e:
        results.update(status="config_error", error=str(e))
        raise
    except BaseException as e:
        results.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if _is_rank_zero():
            write_json_atomic(out / "results.json", results)
    if cfg.get("print_summary", True) and _is_rank_zero():
        print_summary(results)
    return results


def run_amalgamation_job(cfg: DictConfig, dm: Any, out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """experiment=ye2019: label-free, layer-wise amalgamation of multi-task teachers (kd_lightning.amalgamation)."""
    from kd_lightning.amalgamation import check_amalgamation_cfg, print_task_table, run_amalgamation

    check_amalgamation_cfg(to_dict(cfg.amalgamation))
    if cfg.get("dry_run"):
        results["status"] = "dry_run"
        return results
    results.update(run_amalgamation(cfg, dm, out, to_dict(cfg.data)))
    results["status"] = "ok"
    if cfg.get("print_summary", True):
        print_task_table(results)
    return results


def evaluation_results(
    module: DistillationModule, teachers: TeacherEnsemble | None, dm: Any, eval_cfg: dict[str, Any], out: Path
) -> dict[str, Any]:
    """evaluate=robustness: metrics beyond accuracy, written to the run folder and into results.json."""
    result = evaluate_and_write(module.student, teachers, dm, eval_cfg, out, device=module.device)
    summary = robustness_summary(result["robustness"])
    return {
        "metrics": result["clean"],
        "agreement": result.get("agreement", {}),
        "robustness": {m: s["mean"] for m, s in summary.items()},
    }


def _last(trainer: pl.Trainer, key: str) -> float | None:
    v = trainer.callback_metrics.get(key)
    return float(v) if v is not None else None


def _is_rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


# An absolute path: the same conf/ whether started as `kd-train` (console script) or `python -m`.
@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    """Returns val_acc, the objective for Hydra sweepers (Optuna)."""
    if cfg.get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=False))
    try:
        with job_scope():
            return run(cfg).get("val_acc")
    except ConfigError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra marks this job failed and goes on with the others
        print(f"\nConfiguration error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """`kd-train`: name a broken YAML file before Hydra composes it, then hand over to Hydra."""
    try:
        check_config_dirs(config_dirs_from_argv(sys.argv[1:], CONF_DIR))
        sys.argv += torchrun_argv(sys.argv[1:])
    except ConfigError as e:
        print(f"\nConfiguration error: {e}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
