"""OmegaConf resolvers used by the configs; registered by the commands (kd_lightning.cli)."""

from __future__ import annotations

from omegaconf import OmegaConf

from kd_lightning.config.sweeps import resolve_subsets
from kd_lightning.engine.distributed import num_nodes_from_env

RESOLVERS = {
    "kd_subsets": resolve_subsets,  # ${kd_subsets:${teachers.members}[,min[,max]]} → "[a],[b],[a,b]"
    "kd_num_nodes": num_nodes_from_env,  # ${kd_num_nodes:} → nodes from KD_NUM_NODES / SLURM / torchrun
}


def register_resolvers() -> None:
    """Safe to call more than once."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
