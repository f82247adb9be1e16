"""Atomic file writes: a temporary file in the same folder, then a rename.

A reader (another job of a sweep, another rank, a resumed run) sees the old file or the whole new one,
never half of one; a crash mid-write leaves the previous file as it was.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from kd_lightning.errors import ConfigError
from kd_lightning.plain import Plain


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], suffix: str = "") -> Path:
    """Call `write(tmp)` to fill a temporary file next to `path`, then rename it to `path`.

    `suffix` keeps an extension that the writer insists on (numpy's savez appends `.npz`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_torch_atomic(path: str | os.PathLike[str], payload: object) -> Path:
    """A torch file (a model, a checkpoint), whole or not at all: through a Python file object, flushed to
    disk, then renamed; a write that fails (a full disk) raises that OSError, not torch's RuntimeError."""
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            try:
                torch.save(payload, f)
            except RuntimeError as e:  # torch.save reports the OSError of a write as "unexpected pos"
                if isinstance(e.__context__, OSError):
                    raise e.__context__ from None
                raise
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """A text file of the run folder, whole or not at all (a full disk leaves the earlier file, or none)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def _clean(value: object) -> Plain:
    """A value JSON can hold: configs as containers, non-finite floats as null, anything odd as its text."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # never let an odd value cost the results file


def write_json_atomic(path: str | os.PathLike[str], payload: Mapping[str, object]) -> Path:
    """results.json and other records: valid JSON (no NaN tokens), flushed to disk, replaced atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(_clean(payload), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def read_results(path: str | os.PathLike[str]) -> dict[str, Plain]:
    with open(path) as f:
        results = json.load(f)
    if not isinstance(results, dict):
        raise ConfigError(f"{path} must hold a JSON object (a run's results), got {type(results).__name__}")
    return results
