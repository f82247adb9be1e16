"""A run folder belongs to one run at a time, and what it holds is never replaced by accident.

- `claim(out)` takes the folder's lock (`.kd/run.lock`, released by the kernel when the process ends, also
  on SIGKILL) and records the owner (`.kd/owner.json`: pid, host, start). A second run into a live folder
  stops at once with one line naming the live run. `kd-train` claims an explicit `hydra.run.dir` before
  Hydra writes anything into it; `run()` claims every job's folder (reentrant within one process).
- `refuse_to_replace(out, ...)`: a folder that holds a finished, interrupted or unfinished run (or its
  checkpoints) is only continued with `resume=auto`, or replaced with `overwrite=true`; the previous
  results, student and checkpoints are then moved to `.kd/replaced/<time>/`, never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from kd_lightning.errors import ConfigError
from kd_lightning.files import atomic_write
from kd_lightning.plain import Plain

_HELD: dict[str, tuple[FileLock, int]] = {}  # folders this process owns: path → (lock, claims)

FINISHED_WORK = ("results.json", "student.pt", "checkpoints")


class FolderInUse(ConfigError):
    """Another live process owns the run folder."""


def owner_record() -> dict[str, Plain]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _key(out: Path) -> str:
    return str(Path(out).resolve())


def claim(out: str | Path) -> bool:
    """Own `out` for this process; True when this call took the lock (False: this process had it)."""
    out = Path(out)
    key = _key(out)
    if key in _HELD:
        lock, n = _HELD[key]
        _HELD[key] = (lock, n + 1)
        return False
    meta = out / ".kd"
    meta.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(meta / "run.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderInUse(f"{out} is in use by another run ({_describe_owner(out)}); wait for it to end, or "
                          "give this run another folder (hydra.run.dir=...)") from None  # fmt: skip
    atomic_write(meta / "owner.json", lambda tmp: tmp.write_text(json.dumps(owner_record())))
    _HELD[key] = (lock, 1)
    return True


def release(out: str | Path) -> None:
    key = _key(Path(out))
    if key not in _HELD:
        return
    lock, n = _HELD[key]
    if n > 1:
        _HELD[key] = (lock, n - 1)
        return
    del _HELD[key]
    (Path(out) / ".kd" / "owner.json").unlink(missing_ok=True)
    lock.release()


def _describe_owner(out: Path) -> str:
    try:
        o = json.loads((out / ".kd" / "owner.json").read_text())
        return f"pid {o.get('pid')} on {o.get('host')}, started {o.get('started')}"
    except (OSError, ValueError):
        return "its owner did not record itself yet"


def previous_results(out: Path) -> dict[str, Plain] | None:
    path = out / "results.json"
    if not path.is_file():
        return None
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"status": "unreadable"}
    return r if isinstance(r, dict) else {"status": "unreadable"}


def holds_work(out: Path) -> str | None:
    """What a new run would replace in `out` (None: nothing worth keeping)."""
    r = previous_results(out)
    status = (r or {}).get("status")
    checkpoints = (
        sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").is_dir() else []
    )
    if status == "ok":
        acc = (r or {}).get("test_acc")
        return f"a finished run (results.json: status ok{f', test_acc {acc:.4f}' if isinstance(acc, float) else ''})"
    if status in ("running", "interrupted"):
        how = "did not finish (it was killed)" if status == "running" else "was interrupted"
        return f"a run that {how}" + (f", with checkpoints {checkpoints}" if checkpoints else "")
    if checkpoints:
        return f"checkpoints of an earlier run ({', '.join(checkpoints)}; results.json: status {status})"
    return None


def refuse_to_replace(out: Path, resume: str | None, overwrite: bool) -> None:
    """Raise before anything is written when a run without resume=auto would replace earlier work; with
    `overwrite`, move that work aside first."""
    if resume is not None:  # resume=auto, or a checkpoint the user names: continuing is what was asked
        return
    held = holds_work(out)
    if held is None:
        return
    if not overwrite:
        raise ConfigError(
            f"{out} holds {held}; nothing was changed. Continue or skip it with resume=auto, replace it with "
            "overwrite=true (the old files move to .kd/replaced/), or give this run another folder"
        )
    aside = out / ".kd" / "replaced" / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for name in FINISHED_WORK:
        if (out / name).exists():
            shutil.move(str(out / name), str(aside / name))
