"""Hydra helpers: a config node as plain data, and `instantiate` with our errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from kd_lightning.errors import ConfigError
from kd_lightning.plain import Plain, as_plain


def to_plain(cfg: object, where: str = "config", resolve: bool = True) -> Plain:
    """A config node (DictConfig, ListConfig; resolved unless asked not to) or plain data, as plain data."""
    if isinstance(cfg, DictConfig | ListConfig):
        cfg = OmegaConf.to_container(cfg, resolve=resolve)
    return as_plain(cfg, where)


def to_mapping(cfg: object, where: str = "config", resolve: bool = True) -> dict[str, Plain]:
    """`to_plain` of a mapping; ConfigError naming `where` for anything else."""
    value = to_plain(cfg, where, resolve)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return dict(value)


# Any: hydra builds whatever class or function the config names (`_target_`), with the arguments given
def instantiate(cfg: Any, where: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with our own ConfigErrors unwrapped and other failures named by key."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise ConfigError(f"{where}: {e}".replace("\n", " ")) from None
