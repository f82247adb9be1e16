"""OmegaConf resolvers used by the configs; registered by the commands (kd_lightning.cli)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from omegaconf import OmegaConf

from kd_lightning.config.sweeps import resolve_subsets


def num_nodes_from_env() -> int:
    """KD_NUM_NODES, else SLURM's node count, else torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE, else 1."""
    env = os.environ
    if env.get("KD_NUM_NODES"):
        return int(env["KD_NUM_NODES"])
    for key in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if env.get(key):
            return int(env[key])
    if env.get("WORLD_SIZE") and env.get("LOCAL_WORLD_SIZE"):
        return max(1, int(env["WORLD_SIZE"]) // int(env["LOCAL_WORLD_SIZE"]))
    return 1


def launch_rank(env: dict[str, str] | None = None) -> int:
    """This process's global rank as its launcher set it, before any process group exists: torchrun's RANK,
    SLURM's SLURM_PROCID (several tasks), Lightning's LOCAL_RANK for the ranks it starts on one machine."""
    env = dict(os.environ if env is None else env)
    if env.get("RANK"):
        return int(env["RANK"])
    if int(env.get("SLURM_NTASKS", "1")) > 1 and env.get("SLURM_PROCID"):
        return int(env["SLURM_PROCID"])
    return int(env.get("LOCAL_RANK") or 0)


def log_name(job_name: str) -> str:
    """The run's log file: `<job>.log` (train.log) for rank 0, `train_rank<N>.log` for the others, whichever
    launcher started them (Lightning would name its own ranks' logs train_ddp_process_<N>.log)."""
    rank = launch_rank()
    return f"{job_name}.log" if rank == 0 else f"train_rank{rank}.log"


def run_name() -> str:
    """A run's name in a tracker (MLflow's run, W&B's, TensorBoard's version): the command line's overrides
    (`optim.lr=0.01,seed=1`, Hydra's override_dirname), else the job's name."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "run"
    job = HydraConfig.get().job
    return (job.override_dirname or job.name).replace("/", "_")


def user_cache_dir() -> str:
    """The per-user cache: $KD_CACHE_DIR, else the platform's user cache folder (~/.cache/kd_lightning on
    Linux, as torch hub and Hugging Face keep theirs), shared by every folder a run starts from."""
    if os.environ.get("KD_CACHE_DIR"):
        return os.environ["KD_CACHE_DIR"]
    import platformdirs

    return platformdirs.user_cache_dir("kd_lightning", appauthor=False)


_SAID: set[str] = set()


def pool_jobs(jobs_per_gpu: int | str) -> int:
    """hydra/launcher=gpu_pool's n_jobs: `jobs_per_gpu` × the GPUs this machine shows; 1 without a GPU (the
    jobs then run one at a time, said once on the console)."""
    try:
        k = int(jobs_per_gpu)
    except (TypeError, ValueError):
        k = 0
    if k < 1:
        raise ValueError(f"jobs_per_gpu={jobs_per_gpu!r}: hydra/launcher=gpu_pool needs a whole number >= 1")
    gpus = visible_gpus()
    if gpus == 0:
        if "no gpu" not in _SAID:
            _SAID.add("no gpu")
            print("gpu_pool: no CUDA GPU here, so the sweep's jobs run one at a time", file=sys.stderr)
        return 1
    return k * gpus


def visible_gpus() -> int:
    """The CUDA devices this process may use (CUDA_VISIBLE_DEVICES respected), without initialising CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


RESOLVERS: dict[str, Callable[..., object]] = {
    "kd_subsets": resolve_subsets,  # ${kd_subsets:${teachers.members}[,min[,max]]} → "[a],[b],[a,b]"
    "kd_num_nodes": num_nodes_from_env,
    "kd_user_cache": user_cache_dir,  # ${kd_user_cache:} → the per-user cache folder (paths.cache_dir)  # ${kd_num_nodes:} → nodes from KD_NUM_NODES / SLURM / torchrun
    "kd_log_name": log_name,
    "kd_pool_jobs": pool_jobs,  # ${kd_pool_jobs:${jobs_per_gpu}} → n_jobs of hydra/launcher=gpu_pool
    "kd_run_name": run_name,  # ${kd_run_name:} → the overrides of the run, for the trackers' run names  # ${kd_log_name:${hydra.job.name}} → train.log, train_rank1.log, ...
}


def register_resolvers() -> None:
    """Safe to call more than once."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
