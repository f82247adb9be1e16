"""Runners: how a run trains once its data is ready (`runner: distill` by default). The registry is
`registry.py`; `get_runner` imports every other module of this package the first time it is asked, so a
new runner is a new file with a `@register_runner("name")` function, nothing else to edit (and nothing
heavy is imported before a run needs it)."""

from kd_lightning.runners.registry import RunContext, Runner, get_runner, register_runner

__all__ = ["RunContext", "Runner", "get_runner", "register_runner"]
