"""The registry of runners: how a run trains once its data is ready (`runner: distill` by default).

A method that needs its own training loop (Ye et al.'s layer-wise amalgamation) registers a runner
here instead of adding a branch to the generic one:

    @register_runner("amalgamation", summary=print_task_table)
    def run_amalgamation_job(ctx: RunContext) -> None: ...
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from kd_lightning.config.run_spec import RunSpec
from kd_lightning.config.specs import parse
from kd_lightning.errors import ConfigError, choices
from kd_lightning.plain import Plain

if TYPE_CHECKING:  # the datamodule's class imports Lightning; the registry is read before that is needed
    from kd_lightning.data.base import TensorDataModule


K = TypeVar("K")


@dataclass
class RunContext:
    """What every runner gets: the run's spec, the prepared datamodule, the run folder, the results so far,
    the results of the attempt a resume continues, and `keys`, the runner's own settings (the typed spec
    it declared with `register_runner(keys=...)`, read from the config's top-level group named after the
    runner; None when it declared none)."""

    spec: RunSpec
    dm: TensorDataModule  # set up
    out: Path
    results: dict[str, Plain] = field(default_factory=dict)
    earlier: dict[str, Plain] = field(default_factory=dict)  # results.json of the attempt a resume continues
    keys: object = None  # a runner's own dataclass: its type is the runner's to declare (keys_as)

    def keys_as(self, cls: type[K]) -> K:
        """`keys`, checked to be the runner's declared class `cls` (what `register_runner(keys=cls)` reads)."""
        if not isinstance(self.keys, cls):
            raise TypeError(f"this run's keys are a {type(self.keys).__name__}, not a {cls.__name__}")
        return self.keys


@dataclass(frozen=True)
class Runner:
    run: Callable[[RunContext], None]  # fills ctx.results (status "ok" is set by the caller)
    summary: Callable[[Mapping[str, Plain]], None] | None = None
    keys: type | None = None  # a frozen dataclass: the settings this runner reads that RunSpec does not hold

    def read_keys(self, name: str, resolved: Mapping[str, Plain]) -> object:
        """The runner's settings, the config's `<name>.*`, parsed into its `keys` dataclass: an unknown or
        ill-typed key is a ConfigError naming it (kd_lightning.config.specs.parse), before anything runs.
        A runner without `keys` reads nothing beyond the RunSpec; a `keys` class may say what is missing when
        the group is absent (`__missing__`, a message)."""
        if self.keys is None:
            return None
        value = resolved.get(name)
        missing = getattr(self.keys, "__missing__", None)
        if value is None and missing:
            raise ConfigError(str(missing))
        return parse(self.keys, value, name)


def check_groups_of_other_runners(active: str, resolved: Mapping[str, Plain]) -> None:
    """A group that another runner declared as its settings (`amalgamation.*`), set while this runner runs:
    nothing would read it, so the run is refused (`runner=<that runner>` is what was meant)."""
    discover()
    for name, runner in _RUNNERS.items():
        if name != active and runner.keys is not None and resolved.get(name) is not None:
            raise ConfigError(
                f"{name} is set but runner={active}: add runner={name}, or drop the {name} block"
            )


_RUNNERS: dict[str, Runner] = {}


def register_runner(
    name: str, summary: Callable[[Mapping[str, Plain]], None] | None = None, keys: type | None = None
) -> Callable[[Callable[[RunContext], None]], Callable[[RunContext], None]]:
    """Register `fn(ctx)` as `runner=name`; `keys`: a frozen dataclass of its own settings (`name.*`)."""
    if keys is not None and not dataclasses.is_dataclass(keys):
        raise TypeError(f"register_runner({name!r}, keys=...) takes a dataclass, got {keys!r}")

    def deco(fn: Callable[[RunContext], None]) -> Callable[[RunContext], None]:
        if name in _RUNNERS:
            raise ValueError(f"runner {name!r} is registered twice")
        _RUNNERS[name] = Runner(fn, summary, keys)
        return fn

    return deco


def discover() -> None:
    """Import every module of kd_lightning.runners (each registers its runners): a new runner is a new file."""
    here = Path(__file__).parent
    for m in sorted(m.name for m in pkgutil.iter_modules([str(here)])):
        importlib.import_module(f"kd_lightning.runners.{m}")


def get_runner(name: object) -> Runner:
    if name not in _RUNNERS:
        discover()
    if name not in _RUNNERS:
        raise ConfigError(f"runner={name!r}; valid: {choices(_RUNNERS)}")
    return _RUNNERS[name]
