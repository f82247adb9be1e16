"""Check the YAML files of a config tree before Hydra composes them.

Hydra/OmegaConf report a file that is not valid YAML, or that holds a scalar instead of a mapping,
without naming the file; this check names it, with the line, before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml

from kd_lightning.errors import ConfigError


def check_config_file(path: Path) -> None:
    """Raise ConfigError if `path` is not YAML holding a mapping (an empty file is allowed)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if obj is not None and not isinstance(obj, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of `key: value` lines, got a {type(obj).__name__} ({obj!r:.60})"
        )


def check_config_dirs(dirs: Iterable[str | Path]) -> None:
    """Check every *.yaml / *.yml file under each existing directory."""
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            continue
        for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
            check_config_file(path)


def config_dirs_from_argv(argv: list[str], default: Path) -> list[Path]:
    """The packaged conf dir plus any `--config-dir/-cd DIR` or `--config-path/-cp DIR` a user passes."""
    dirs = [default]
    for i, arg in enumerate(argv):
        for flag in ("--config-dir", "-cd", "--config-path", "-cp"):
            if arg == flag and i + 1 < len(argv):
                dirs.append(Path(argv[i + 1]))
            elif arg.startswith(flag + "="):
                dirs.append(Path(arg.split("=", 1)[1]))
    return dirs
