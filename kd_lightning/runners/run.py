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

from kd_lightning.config.resolvers import register_resolvers
from kd_lightning.config.specs import items, mapping, parse, seed_field
from kd_lightning.data.base import TensorDataModule
from kd_lightning.data.fingerprint import note_changes
from kd_lightning.data.from_config import instantiate_datamodule
from kd_lightning.engine import run_folder
from kd_lightning.engine.build import resolve_pretrained_models
from kd_lightning.engine.distributed import is_rank_zero
from kd_lightning.engine.resume import (
    check_resume,
    config_hash,
    interruption,
    newest_checkpoint,
    raise_on_sigterm,
    resume_command,
    resume_mode,
)
from kd_lightning.errors import ConfigError, as_int
from kd_lightning.runners.registry import RunContext, get_runner
from kd_lightning.runners.results import run_labels, write_json_atomic

log = logging.getLogger("kd_lightning")
register_resolvers()  # the configs' ${kd_...} resolvers, also for run() called through the API


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
    if listings and is_rank_zero():  # data read from disk: say so when it changed since the last run
        note_changes(dm.name, listings, cfg.paths.cache_dir)
    return dm


def write_resolved_config(cfg: DictConfig, out: Path) -> None:
    """config.resolved.yaml: the run's config with every interpolation resolved (kd-eval rebuilds from it)."""
    if is_rank_zero():
        plain = {k: v for k, v in cfg.items() if k != "hydra"}  # present when composed by the API
        text = OmegaConf.to_yaml(
            OmegaConf.create(OmegaConf.to_container(OmegaConf.create(plain), resolve=True))
        )
        (out / "config.resolved.yaml").write_text(text)


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
    owner = is_rank_zero()
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
