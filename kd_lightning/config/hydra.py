"""Hydra helpers: a config node as plain data, and `instantiate` with our errors."""

from __future__ import annotations

from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from kd_lightning.errors import ConfigError


def to_dict(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig | ListConfig) else cfg


def instantiate(cfg: Any, where: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with our own ConfigErrors unwrapped and other failures named by key."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise ConfigError(f"{where}: {e}".replace("\n", " ")) from None
