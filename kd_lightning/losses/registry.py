"""One registry for distances and method terms: `name -> nn.Module class` with forward(student, teacher)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from kd_lightning.errors import ConfigError, choices

_LOSSES: dict[str, type[nn.Module]] = {}


def register_loss(*names: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        for name in names:
            if name in _LOSSES:
                raise ValueError(f"loss {name!r} is registered twice")
            _LOSSES[name] = cls
        return cls

    return deco


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    if name not in _LOSSES:
        raise ConfigError(f"unknown distance/loss {name!r}; valid: {choices(_LOSSES)}")
    cls = _LOSSES[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(
            f"loss {name!r} got unknown option(s) {unknown}; valid options: {choices(params) or '(none)'}"
        )
    return cls(**kwargs)
