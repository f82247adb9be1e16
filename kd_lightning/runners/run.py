"""One run, in stages: config → RunSpec → data → (runner: teachers → module → fit → test → report, export).

`run(cfg)` owns what every run shares: stage 0 (the composed config parsed into one RunSpec,
kd_lightning.config.run_spec), the output folder, resume=auto, results.json (written also on failure) and
the summary. What happens once the data is ready is the runner's (`runner: distill`,
kd_lightning.runners.distill; `runner: amalgamation`, kd_lightning.runners.amalgamation). Each stage
returns a typed object, so a stage can be tested, replaced or reused alone.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from kd_lightning.config.request import RunRequest, read_request
from kd_lightning.config.run_spec import RunSpec, TrainerSpec
from kd_lightning.engine import launch, run_folder
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
from kd_lightning.errors import ConfigError
from kd_lightning.files import write_text_atomic
from kd_lightning.plain import Plain

if TYPE_CHECKING:  # Lightning and torch are imported when a run gets that far, not before stage 0
    from kd_lightning.data.base import TensorDataModule
from kd_lightning.runners.registry import RunContext, Runner, check_groups_of_other_runners, get_runner
from kd_lightning.runners.results import write_json_atomic

log = logging.getLogger("kd_lightning")


def check_accelerator(spec: RunSpec) -> None:
    """A GPU trainer on a machine without one fails here, in one line, not in Lightning's device setup."""
    accelerator = spec.trainer.accelerator
    if accelerator in ("gpu", "cuda") and not _cuda():
        choice = HydraConfig.get().runtime.choices.get("trainer") if HydraConfig.initialized() else None
        raise ConfigError(
            f"trainer.accelerator={accelerator}"
            + (f" (trainer={choice})" if choice else "")
            + " but this machine has no CUDA GPU (torch.cuda.is_available() is False). Use trainer=auto or "
            "trainer=cpu on one process, trainer=ddp_cpu for several, or KD_ACCELERATOR=cpu with trainer=multinode"
        )


def write_traceback(text: str, out: Path) -> Path:
    """The full traceback of a failed run, into the run's log file (Hydra's `<job>.log`), not the console;
    into `<run>/error.log` when the run has no log file (run() called through the API)."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for h in files:
        h.acquire()
        try:
            if h.stream is not None:
                h.stream.write(text)
            h.flush()
        finally:
            h.release()
    if files:
        return Path(files[0].baseFilename)
    path = out / "error.log"
    with open(path, "a") as f:
        f.write(text)
    return path


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def stage_data(spec: RunSpec) -> TensorDataModule:
    """Stage 1: the datamodule, set up (splits, normalisation); its shuffles follow the run's seed."""
    from kd_lightning.data.fingerprint import note_changes
    from kd_lightning.engine.build import build_datamodule

    dm = build_datamodule(spec)
    dm.prepare_data()
    dm.setup("fit")
    log.info("data %s", dm.describe())
    listings = dm.content_listings()
    if listings and is_rank_zero():  # data read from disk: say so when it changed since the last run
        note_changes(dm.name, listings, spec.paths.cache_dir)
    return dm


def write_resolved_config(resolved: Mapping[str, Plain], out: Path) -> None:
    """config.resolved.yaml: the run's config with every interpolation resolved (kd-eval rebuilds from it)."""
    if is_rank_zero():
        write_text_atomic(out / "config.resolved.yaml", OmegaConf.to_yaml(OmegaConf.create(dict(resolved))))


def run(cfg: RunRequest | Mapping[str, Plain]) -> dict[str, Plain]:
    """One experiment; returns the results dict that it also writes to results.json. `cfg`: the composed
    config (read once, by kd_lightning.config.request.read_request) or the request read from it.

    The run owns its folder while it runs (kd_lightning.run_folder): a second run into it stops at once,
    and a folder that holds earlier work is continued only with resume=auto or replaced only with
    overwrite=true. results.json says `running` (start, host, pid, the config's hash) from the start.
    With resume=auto a finished run (results.json `ok` for this same config hash) is not repeated, and an
    unfinished one continues from its last checkpoint: re-launching a sweep only redoes what is missing. A
    config that changed what the run computes is refused first (kd_lightning.resume), before anything is
    written.
    """
    request = cfg if isinstance(cfg, RunRequest) else read_request(cfg)
    out = request.output_dir
    owner = is_rank_zero()
    team = launch.peers(out)  # the other ranks of a torchrun or srun launch, who follow rank 0's verdict
    if team is not None and not team.leader:
        verdict = launch.agreed or team.wait()
        if verdict.kind == launch.REFUSE:
            raise ConfigError(verdict.message)
        if verdict.kind == launch.SKIP:
            return run_folder.previous_results(out) or {}
    try:
        out.mkdir(parents=True, exist_ok=True)
        if owner:  # the other ranks of a DDP run exist only while rank 0 owns the folder
            run_folder.claim(out)
        try:
            return _run_in_folder(request, owner, team)
        finally:
            if owner:
                run_folder.release(out)
    except BaseException as e:
        if team is not None:  # rank 0 stopped before saying the run starts: the others stop with it
            team.publish(launch.refusal(e))
        raise


@dataclass
class _Stage0:
    """The request checked as a whole, before anything is written: the spec with its runner's own keys, or
    the ConfigError that stops the run."""

    spec: RunSpec | None
    problem: ConfigError | None
    runner: Runner | None = None
    keys: object = None  # the runner's own typed keys (register_runner(keys=...)), None when it has none


def _stage0(request: RunRequest) -> _Stage0:
    spec = request.spec
    if spec is None:
        return _Stage0(None, request.problem)
    job = launch.pooled_job()
    if job is not None:  # hydra/launcher=gpu_pool: this job's GPU
        from kd_lightning.config.resolvers import visible_gpus

        options = launch.pool_devices(spec.trainer.options, job, visible_gpus())
        spec = dataclasses.replace(spec, trainer=TrainerSpec(options))
    try:
        launch.check_world(spec.trainer.options)
        name, resolved = spec.settings.runner, spec.resolved
        runner = get_runner(name)
        check_groups_of_other_runners(name, resolved)
        return _Stage0(spec, None, runner, runner.read_keys(name, resolved))
    except ConfigError as e:
        return _Stage0(None, e)


@dataclass
class Opened:
    """A run whose folder is checked and whose results.json may be written: stage 0's outcome, the results so
    far (`running`) and those of the attempt it continues (resume=auto)."""

    stage: _Stage0
    results: dict[str, Plain]
    earlier: dict[str, Plain]


def open_run(request: RunRequest, owner: bool, team: launch.Peers | None) -> Opened | dict[str, Plain]:
    """Stage 0 and the folder's checks: resume=auto's verdict (a finished run's results, returned as they
    are), or the refusal to replace earlier work. Nothing is written yet."""
    out, resume = request.output_dir, resume_mode(request.resume)
    stage = _stage0(request)
    spec = stage.spec
    digest = config_hash(spec.resolved) if spec is not None else None
    accepted: list[str] = []
    earlier: dict[str, Plain] = {}  # results.json of the attempt this run continues (resume=auto)
    if resume == "auto":
        if spec is None:
            if owner and run_folder.holds_work(out):
                assert stage.problem is not None  # stage 0 gives a spec or a problem
                raise stage.problem  # the folder's earlier work stays as it is
        else:
            accepted = check_resume(spec.resolved, spec.settings.resume_accept, out)
            if accepted:
                log.info("resume=auto: continuing %s with accepted changes: %s", out, "; ".join(accepted))
            done = earlier = (run_folder.previous_results(out) or {}) if owner else {}
            same = done.get("config_hash") == digest if "config_hash" in done else not accepted
            if done.get("status") == "ok" and same:
                log.info("resume=auto: %s already finished with this config, not repeating it", out)
                if team is not None:
                    team.publish(launch.Verdict(launch.SKIP, f"{out} already finished with this config"))
                return done
    elif owner:
        run_folder.refuse_to_replace(out, resume, request.overwrite)
    return Opened(stage, _started_results(request, digest, accepted), earlier)


def _run_in_folder(request: RunRequest, owner: bool, team: launch.Peers | None) -> dict[str, Plain]:
    out = request.output_dir
    opened = open_run(request, owner, team)
    if not isinstance(opened, Opened):
        return opened
    stage, results = opened.stage, opened.results
    if team is not None:  # every check that can refuse the run is behind us: the other ranks may start
        team.publish(
            launch.refusal(stage.problem) if stage.problem is not None else launch.Verdict(launch.GO)
        )
    if owner:
        write_json_atomic(out / "results.json", results)
    _execute(stage, out, owner, results, opened.earlier)
    show_summary(stage, results, out, owner)
    return results


def show_summary(stage: _Stage0, results: dict[str, Plain], out: Path, owner: bool = True) -> None:
    """The end-of-run table (or the dry run's paragraph) on the console, when the run prints one."""
    spec = stage.spec
    if spec is not None and spec.settings.print_summary and owner and stage.runner is not None:
        if results["status"] == "dry_run":
            print(results.get("dry_run_summary") or f"dry run: built and checked; nothing trained ({out})")
        elif stage.runner.summary is not None:
            stage.runner.summary(results)


def _started_results(request: RunRequest, digest: str | None, accepted: list[str]) -> dict[str, Plain]:
    """results.json as a run starts: `running`, its labels, folder, config hash and owner."""
    results: dict[str, Plain] = {
        "status": "running",
        "seed": request.seed,
        **request.labels,
        "output_dir": str(request.output_dir),
        "config_hash": digest,
        **{f"run_{k}": v for k, v in run_folder.owner_record().items()},
    }
    if accepted:
        results["resume_accepted"] = accepted
    return results


def _execute(
    stage: _Stage0, out: Path, owner: bool, results: dict[str, Plain], earlier: dict[str, Plain]
) -> None:
    """Data, then the runner; results.json says how it ended (ok, config_error, failed, interrupted)."""
    previous_sigterm = raise_on_sigterm()
    try:
        if stage.problem is not None:
            raise stage.problem
        assert stage.spec is not None and stage.runner is not None
        check_accelerator(stage.spec)
        import pytorch_lightning as pl

        from kd_lightning.engine.build import resolve_pretrained_models
        from kd_lightning.engine.trainers import quiet_lightning

        quiet_lightning(stage.spec.settings.verbose)
        pl.seed_everything(stage.spec.seed, workers=True)
        dm = stage_data(stage.spec)
        spec = resolve_pretrained_models(stage.spec)
        write_resolved_config(spec.resolved, out)
        stage.runner.run(RunContext(spec, dm, out, results, earlier, stage.keys))
        if results["status"] == "running":
            results["status"] = "ok"
    except ConfigError as e:
        results.update(status="config_error", error=str(e))
        raise
    except BaseException as e:
        _record_failure(e, out, owner, results)
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if owner:
            results["run_ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_json_atomic(out / "results.json", results)


def _record_failure(e: BaseException, out: Path, owner: bool, results: dict[str, Plain]) -> NoReturn:
    """An error or a stop signal, in results.json (with the last checkpoint and how to resume); raised again."""
    stop = interruption(e)
    if stop is None:
        last = newest_checkpoint(out) if owner else None
        text = traceback.format_exc()
        results.update(
            status="failed",
            error=f"{type(e).__name__}: {e}",
            traceback=text,
            last_checkpoint=str(last) if last else None,
            log_file=str(write_traceback(text, out)) if owner else None,
        )
        raise
    last = newest_checkpoint(out)
    results.update(
        status="interrupted",
        error=f"interrupted by {stop}",
        last_checkpoint=str(last) if last else None,
        resume_command=resume_command(out),
    )
    raise stop from None
