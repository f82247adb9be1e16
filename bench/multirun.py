"""The one way the benchmarks launch kd-train: print the command, run it quietly, show the end of its
stderr when it fails."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_quietly(cmd: list[str], tag: str, shown: str | None = None) -> int:
    """Run `cmd` in the repository root with warnings off; returns its exit code."""
    print(f"[{tag}] {shown or ' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True
    )
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
    return proc.returncode


def folder_for(label: str) -> str:
    """A row label as a multirun folder name that Hydra's override grammar takes in hydra.sweep.dir
    (brackets, commas, `=` and spaces in a label break the override)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def pts(diff: float, half: float) -> str:
    """A difference of fractions and its interval's half-width, in points: `+1.23 [+0.45, +2.01]`."""
    return f"{100 * diff:+.2f} [{100 * (diff - half):+.2f}, {100 * (diff + half):+.2f}]"


DONE = ".bench_done"  # written into a multirun's folder once every job of it ended ok


def finished(folder: Path) -> bool:
    """A multirun that an earlier invocation (--into) saw end with every job ok: reused, not rerun. The
    marker is written only then (a stopped multirun has no folders yet for the jobs it did not start)."""
    return (Path(folder) / DONE).is_file()


def mark_finished(folder: Path) -> None:
    (Path(folder) / DONE).write_text("")
