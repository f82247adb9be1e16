"""What DDP needs from us beyond Lightning's Trainer: one run folder per job, and the node count.

Lightning's `ddp` strategy starts ranks 1..N-1 by re-running the command line. Under a Hydra
*multirun* that command line is the whole sweep, and Hydra's run dir is not the job's folder, so the
children would start new sweeps in new folders. Before fitting, rank 0 therefore writes this job's fully
resolved config to `<job>/.kd/ddp_job.yaml` and points the command line (and Hydra's run dir) at it:
every child runs exactly this job, in this job's folder, and writes nothing of Hydra's there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict, read_write

from kd_lightning.config.resolvers import num_nodes_from_env  # noqa: F401  (the node count: trainer=multinode)
from kd_lightning.errors import ConfigError
from kd_lightning.files import atomic_write
from kd_lightning.plain import Plain

JOB_CONFIG = "ddp_job"
# the children's log is named by their rank (train_rank1.log), as conf/hydra/default.yaml names every rank's
RANK_LOG = (
    "hydra.job_logging.handlers.file.filename='${hydra.runtime.output_dir}/${kd_log_name:${hydra.job.name}}'"
)

# Variables set by launchers that start every rank themselves (Lightning then spawns nothing).
_EXTERNAL_LAUNCH = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def spawns_children(trainer_cfg: Mapping[str, Plain]) -> bool:
    """True when Lightning will re-run the command line to start more ranks on this node."""
    strategy = str(trainer_cfg.get("strategy", "auto"))
    if "ddp" not in strategy or "spawn" in strategy or "fork" in strategy:
        return False
    if any(k in os.environ for k in _EXTERNAL_LAUNCH) or "SLURM_NTASKS" in os.environ:
        return False
    devices = trainer_cfg.get("devices", 1)
    return (
        str(devices) in ("-1", "auto")
        or (str(devices).isdigit() and int(str(devices)) > 1)
        or (not isinstance(devices, int | str))
    )


def pin_ddp_children_to_job(
    trainer: Mapping[str, Plain], config: Mapping[str, Plain], out: Path
) -> Path | None:
    """Rank 0, before `trainer.fit`: make the ranks Lightning re-launches run exactly this job (`config`, the
    run's resolved config; `trainer`, its Trainer arguments)."""
    if not HydraConfig.initialized() or not spawns_children(trainer):
        return None
    path = out / ".kd" / f"{JOB_CONFIG}.yaml"
    resolved = OmegaConf.create(dict(config))
    atomic_write(path, lambda tmp: OmegaConf.save(resolved, tmp))
    sys.argv[1:] = ["--config-path", str(path.parent), "--config-name", JOB_CONFIG, RANK_LOG]
    hydra_cfg = HydraConfig.get()
    with read_write(hydra_cfg), open_dict(hydra_cfg):  # type: ignore[arg-type]  # Hydra's config node at run time
        hydra_cfg.run.dir = str(out)  # Lightning appends hydra.run.dir=<this> to the children's command
    return path


def leave_process_group() -> None:
    """After a multi-process fit: drop the process group so later single-process work never syncs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank has finished fitting
        dist.destroy_process_group()


_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOBAL_RANK")


@contextmanager
def job_scope() -> Iterator[None]:
    """One job's DDP state does not leak into the next job of a multirun in the same process.

    Lightning leaves LOCAL_RANK/WORLD_SIZE/MASTER_PORT in os.environ and the process group alive after
    launching ranks; the next job would then believe its ranks were started externally and wait forever.
    """

    def group() -> bool:  # torch not imported yet: no process group can exist (and none is imported here)
        dist = sys.modules.get("torch.distributed")
        return dist is not None and dist.is_available() and dist.is_initialized()

    before = {k: os.environ.get(k) for k in _DDP_ENV}
    had_group = group()
    argv = list(sys.argv)
    try:
        yield
    finally:
        if not had_group and group():
            sys.modules["torch.distributed"].destroy_process_group()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        sys.argv[:] = argv


def launched_as_rank_zero(env: Mapping[str, str] = os.environ) -> bool:
    """False in a process that a launcher started as another rank (Lightning's DDP children, torchrun's,
    SLURM's other tasks): those share rank 0's run folder."""
    return all(env.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def ranks_argv(argv: list[str], env: Mapping[str, str] = os.environ) -> list[str]:
    """Under torchrun or srun every rank runs `kd-train`: they must share one run folder, and only rank 0
    writes Hydra's files there (each rank's log is named by conf/hydra/default.yaml). Returns the extra
    overrides for this rank; raises ConfigError when the folder would differ between ranks (Hydra's default
    folder name is a timestamp)."""
    from kd_lightning.engine.launch import slurm_tasks

    torchrun = "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1
    if not (torchrun or slurm_tasks(env)):
        return []
    multirun = "-m" in argv or "--multirun" in argv
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if not any(a.startswith(key + "=") for a in argv):
        who = "torchrun" if torchrun else "srun"
        raise ConfigError(
            f"under {who} every rank must write to the same folder: pass {key}=<a folder all nodes can reach>"
        )
    rank = env.get("RANK", "0") if torchrun else env.get("SLURM_PROCID", "0")
    return [] if rank == "0" else ["hydra.output_subdir=null"]


def is_rank_zero() -> bool:
    """Whether this process is global rank 0: Lightning's rank once Lightning runs, before that the
    launcher's environment (what Lightning reads too), so that asking imports nothing."""
    rank_zero = sys.modules.get("lightning_fabric.utilities.rank_zero")
    if rank_zero is not None:
        return getattr(rank_zero.rank_zero_only, "rank", 0) == 0
    return launched_as_rank_zero()
