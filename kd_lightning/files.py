"""Atomic file writes: a temporary file in the same folder, then a rename.

A reader (another job of a sweep, another rank, a resumed run) sees the old file or the whole new one,
never half of one; a crash mid-write leaves the previous file as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object], suffix: str = "") -> Path:
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
