"""kd-train: the Hydra entry point. Compose, run (kd_lightning.runners.run), report configuration errors.

Writes into the run's output dir: results.json (always, also on failure), config.resolved.yaml,
student.pt (the student alone: loads with `kd_lightning.models.load_model`) and Lightning checkpoints.
Every configuration error, from composition to the last check before training, ends the same way:
one line naming the key and what would be valid, exit code 2, no traceback.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kd_lightning.cli import config_error_exit
from kd_lightning.config.conf_files import (
    CONF_DIR,
    check_composition,
    check_config_dirs,
    check_launcher,
    config_dirs_from_argv,
    launcher_argv,
)
from kd_lightning.config.resolvers import launch_rank, register_resolvers
from kd_lightning.engine import launch, run_folder
from kd_lightning.engine.distributed import job_scope, launched_as_rank_zero, ranks_argv
from kd_lightning.engine.resume import RunInterrupted, newest_checkpoint, resume_command, resume_mode
from kd_lightning.errors import ConfigError
from kd_lightning.plain import plain_num

register_resolvers()

__all__ = ["main"]


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    """Returns val_acc, the objective for Hydra sweepers (Optuna)."""
    if cfg.get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=False))
    from kd_lightning.runners.run import run  # imports Lightning only once the run gets that far

    try:
        with job_scope():
            val = run(cfg).get("val_acc")
            return plain_num(val, "val_acc") if val is not None else None
    except ConfigError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra marks this job failed and goes on with the others
        config_error_exit(e)
    except RunInterrupted as e:  # the whole command stops, also a multirun
        print(
            f"\nInterrupted ({e}); results.json says status interrupted. Resume with:\n  {resume_command(Path(cfg.paths.output_dir))}",
            file=sys.stderr,
        )
        sys.exit(e.exit_code)
    except Exception as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra marks this job failed and goes on with the others
        said = failure_lines(e, Path(cfg.paths.output_dir))
        if said is None:
            raise  # not a failure a user's setting or data explains: the whole traceback helps more
        print("\n" + "\n".join(said), file=sys.stderr)
        sys.exit(1)


def failure_lines(e: BaseException, out: Path) -> list[str] | None:
    """Two lines for a failure the user's settings, data or cluster cause (non-finite loss, out of memory, a
    file that cannot be read or written, another rank or node that died): the cause and what to change,
    then the last good checkpoint (or that there is none) with how to continue, and where the full traceback
    is. None for anything else."""
    text = f"{e}".strip().splitlines()[0] if str(e).strip() else type(e).__name__
    oom = isinstance(e, MemoryError) or "out of memory" in str(e).lower()
    if isinstance(e, FloatingPointError):
        cause = f"Training failed: {text}"
    elif oom:
        cause = (
            f"Training failed: out of memory ({text}). Lower data.batch_size (and data.eval_batch_size), use "
            "trainer.precision=bf16-mixed or 16-mixed, or smaller models"
        )
    elif lost_a_rank(e):
        cause = (
            f"Training failed on rank {launch_rank()}: another rank of this run stopped ({text}); its node's log "
            "says why (a node that died, was preempted or ran out of memory)"
        )
    elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        cause = (
            f"Training failed: no space left on the device of {out} ({text}). Every file of the run folder is "
            "whole (written to a temporary file, then renamed): free space there and continue the run"
        )
    elif isinstance(e, OSError):
        cause = (
            f"Training failed: {text}. A file could not be read or written: fix or remove it, or free space"
        )
    else:
        return None
    results = run_folder.previous_results(out) or {}
    last, log_file = results.get("last_checkpoint") or newest_checkpoint(out), results.get("log_file")
    where = f"full traceback in {log_file}" if log_file else "full traceback in the run's log"
    if last:
        how = (
            "launch the same command again with resume=auto"
            if lost_a_rank(e)
            else "resume=auto continues from it"
        )
        return [cause, f"The last good checkpoint is {last} ({how}: {resume_command(out)}); {where}"]
    return [cause, f"No checkpoint was written before the failure; {where}"]


def lost_a_rank(e: BaseException) -> bool:
    """A collective failed because another process of the run is gone (gloo's closed connections, NCCL's
    aborted communicator, torch.distributed's own errors)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("connection reset by peer", "connection closed by peer", "gloo", "nccl")
    )


def loss_options(distance: str) -> list[str]:
    """A distance's own options (its constructor's arguments), for the message about a misspelt term key."""
    try:
        from kd_lightning.losses.registry import loss_options as options

        return sorted(options(distance))
    except Exception:  # an unknown distance: its own message comes later
        return []


def explicit_folder(argv: list[str]) -> Path | None:
    """The folder a command line names for its run (`hydra.run.dir=`) or its sweep (`hydra.sweep.dir=`), as
    Hydra reads it (quotes removed, escapes undone): the folder that is locked is the one the run writes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    key = "hydra.sweep.dir=" if ("-m" in argv or "--multirun" in argv) else "hydra.run.dir="
    found = [a for a in argv if a.startswith(key)]
    if not found:
        return None
    try:
        value = OverridesParser.create().parse_override(found[-1]).value()
    except Exception:  # Hydra will report the override itself
        return Path(found[-1][len(key) :])
    return Path(str(value))


def claim_before_hydra(argv: list[str], cfg: DictConfig | None) -> Path | None:
    """Own the run's (or the sweep's) folder before Hydra writes its files there: a second command into a
    live folder, or one that would replace a finished run, stops here and changes nothing. Ranks other
    than 0 (Lightning's DDP children, torchrun's other ranks) share rank 0's folder and claim nothing."""
    folder = explicit_folder(argv)
    if folder is None or cfg is None or not launched_as_rank_zero():
        return None
    run_folder.claim(folder)
    if "-m" not in argv and "--multirun" not in argv:
        try:
            run_folder.refuse_to_replace(folder, resume_mode(cfg.get("resume")), bool(cfg.get("overwrite")))
        except ConfigError:
            run_folder.release(folder)
            raise
    return folder


def follow_rank_zero(argv: list[str]) -> None:
    """A rank that torchrun or srun started besides rank 0: wait for rank 0's verdict before Hydra writes
    anything (kd_lightning.engine.launch); a refused run ends here with rank 0's line, a finished one too."""
    folder = explicit_folder(argv)
    if folder is None or launched_as_rank_zero():
        return
    team = launch.peers(folder)
    if team is None or team.leader:
        return
    verdict = team.wait()
    if verdict.kind == launch.REFUSE:
        raise ConfigError(verdict.message)
    if verdict.kind == launch.SKIP:
        print(f"{verdict.message}; not repeating it (rank {team.rank})")
        sys.exit(0)
    launch.agreed = verdict


def main() -> None:
    """`kd-train`: check the YAML files and the composition first, then hand over to Hydra."""
    argv = sys.argv[1:]
    folder = None
    try:
        check_config_dirs(config_dirs_from_argv(argv, CONF_DIR))
        cfg = check_composition(argv, CONF_DIR, loss_options)
        check_launcher(argv, CONF_DIR)
        sys.argv += ranks_argv(argv) + launcher_argv(argv)
        follow_rank_zero(argv)
    except ConfigError as e:  # every rank finds these alike
        config_error_exit(e)
    try:
        folder = claim_before_hydra(argv, cfg)
    except ConfigError as e:  # rank 0's alone: the other ranks wait for its verdict, this is it
        named = explicit_folder(argv)
        team = launch.peers(named) if named is not None else None
        if team is not None:
            team.publish(launch.refusal(e))
        config_error_exit(e)
    try:
        hydra_main()
    finally:
        if folder is not None:
            run_folder.release(folder)


if __name__ == "__main__":
    main()
