"""Runners: how a run trains once its data is ready (`runner: distill` by default). The registry is
`registry.py`; every other module of this package is imported here, so a new runner is a new file with a
`@register_runner("name")` function, nothing else to edit."""

import importlib
import pkgutil

from kd_lightning.runners.registry import RunContext, Runner, get_runner, register_runner

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")

__all__ = ["RunContext", "Runner", "get_runner", "register_runner"]
