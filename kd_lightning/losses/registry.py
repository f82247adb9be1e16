"""One registry for distances and method terms: `name -> nn.Module class`, `forward(student, teacher)`.

A loss class may also
- set `shape_free = True` when student and teacher features may differ in size (relational methods,
  attention maps, its own embedding heads): the term then uses no adapter unless one is asked for;
- take `y` (labels), `index` (sample indices) and/or `epoch` as keyword arguments of `forward`;
- take `student_shape`, `teacher_shape`, `num_samples`, `num_classes` in `__init__`: these are filled
  in by the framework from the dry batch and the data, never from the config.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping

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


INJECTED = ("student_shape", "teacher_shape", "num_samples", "num_classes")
FORWARD_EXTRAS = ("y", "index", "epoch")


def loss_class(name: str) -> type[nn.Module]:
    if name not in _LOSSES:
        raise ConfigError(f"unknown distance/loss {name!r}; valid: {choices(_LOSSES)}")
    return _LOSSES[name]


def forward_extras(loss: nn.Module) -> tuple[str, ...]:
    """Which of y / index / epoch the loss's forward takes."""
    params = inspect.signature(loss.forward).parameters
    return tuple(p for p in FORWARD_EXTRAS if p in params)


def loss_options(name: str) -> list[str]:
    """The options a loss takes from the config: its constructor's arguments, less what is filled in."""
    params = inspect.signature(loss_class(name).__init__).parameters
    return [p for p in params if p not in ("self", "args", "kwargs", *INJECTED)]


def check_options(name: str, given: Iterable[str]) -> None:
    """Every option given to loss `name` is one of its constructor's (built-in and registered ones alike; a
    misspelt option is never ignored), with the nearest valid one named."""
    options = loss_options(name)
    unknown = sorted(set(given) - set(options))
    if not unknown:
        return
    near = {u: difflib.get_close_matches(u, options, n=1) for u in unknown}
    hint = "; ".join(f"{u!r}: did you mean {m[0]!r}?" for u, m in near.items() if m)
    raise ConfigError(
        f"loss {name!r} got unknown option(s) {unknown}"
        + (f" ({hint})" if hint else "")
        + f"; valid options: {choices(options) or '(none)'}"
    )


def create_loss(name: str, injected: Mapping[str, object] | None = None, **kwargs: object) -> nn.Module:
    cls = loss_class(name)
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    check_options(name, kwargs)
    needed = [p for p in params if p in INJECTED]
    missing = [p for p in needed if p not in (injected or {})]
    if missing:
        raise ConfigError(f"loss {name!r} needs {missing}, which this objective cannot provide")
    try:
        return cls(**kwargs, **{p: (injected or {})[p] for p in needed})
    except TypeError as e:
        raise ConfigError(f"loss {name!r}: {e}") from None
