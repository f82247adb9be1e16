"""OmegaConf resolvers used by the configs; registered when kd_lightning.train is imported."""

from __future__ import annotations

from omegaconf import OmegaConf

from kd_lightning.distributed import num_nodes_from_env
from kd_lightning.sweeps import resolve_subsets

RESOLVERS = {
    "kd_subsets": resolve_subsets,  # ${kd_subsets:${teachers.members}[,min[,max]]} → "[a],[b],[a,b]"
    "kd_num_nodes": num_nodes_from_env,  # ${kd_num_nodes:} → nodes from KD_NUM_NODES / SLURM / torchrun
}


def register_resolvers() -> None:
    """Safe to call more than once."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
