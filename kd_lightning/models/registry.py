"""A tiny explicit model registry: one decorated function per architecture (timm-style)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from torch import nn

from kd_lightning.errors import ConfigError, choices

ModelFn = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFn] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Register `fn(num_classes, input_shape, **kwargs) -> nn.Module` under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_fn(name: str) -> ModelFn | None:
    return _REGISTRY.get(name)


def call_model_fn(
    name: str, fn: ModelFn, num_classes: int, input_shape: tuple[int, ...], kwargs: Mapping[str, object]
) -> nn.Module:
    """Call a model factory, turning unknown keyword arguments into a ConfigError listing the valid ones."""
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not accepts_any:
        valid = [p for p in params if p not in ("num_classes", "input_shape")]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ConfigError(
                f"model {name!r} got unknown option(s) {unknown}; valid options: {choices(valid) or '(none)'}"
            )
    return fn(num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)
