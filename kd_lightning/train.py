"""kd-train: the Hydra entry point. Compose, run (kd_lightning.runner), report configuration errors.

Writes into the run's output dir: results.json (always, also on failure), config.resolved.yaml,
student.pt (the student alone: loads with `kd_lightning.models.load_model`) and Lightning checkpoints.
Every configuration error, from composition to the last check before training, ends the same way:
one line naming the key and what would be valid, exit code 2, no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kd_lightning.config_files import CONF_DIR, check_composition, check_config_dirs, config_dirs_from_argv
from kd_lightning.distributed import job_scope, torchrun_argv
from kd_lightning.errors import ConfigError
from kd_lightning.resolvers import register_resolvers
from kd_lightning.resume import RunInterrupted, resume_command
from kd_lightning.runner import run

register_resolvers()

__all__ = ["main", "run"]


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
        config_error_exit(e)
    except RunInterrupted as e:  # the whole command stops, also a multirun
        print(
            f"\nInterrupted ({e}); results.json says status interrupted. Resume with:\n  {resume_command(Path(cfg.paths.output_dir))}",
            file=sys.stderr,
        )
        sys.exit(e.exit_code)


def config_error_exit(e: ConfigError) -> None:
    print(f"\nConfiguration error: {e}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    """`kd-train`: check the YAML files and the composition first, then hand over to Hydra."""
    argv = sys.argv[1:]
    try:
        check_config_dirs(config_dirs_from_argv(argv, CONF_DIR))
        check_composition(argv, CONF_DIR)
        sys.argv += torchrun_argv(argv)
    except ConfigError as e:
        config_error_exit(e)
    hydra_main()


if __name__ == "__main__":
    main()
