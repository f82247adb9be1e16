"""Models fitted on first use and cached on disk: teachers, pre-trained students, multi-task teachers.

The file name carries a hash of everything that decides the fit, so a changed config never reuses a
stale file; a file lock makes parallel sweep jobs fit it once while the others wait for it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from kd_lightning.errors import safe_name


def keyed_path(folder: str | Path, stem: str, key: object) -> Path:
    """`folder/<stem>-<10 hex digits of the key's JSON>.pt`; `stem` must be a plain name (no path)."""
    safe_name("a cache file's name", stem)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(folder) / f"{stem}-{digest}.pt"


def fit_once(path: Path, fit: Callable[[], None]) -> Path:
    """Run `fit` (which writes `path`) unless the file exists; at most one process at a time."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.is_file():
                fit()
    return path
