"""How long kd-train takes to answer when it trains nothing: a configuration error, a misspelt key, --help.

    python bench/startup.py [--reps 5]

Each figure is the median [min–max] wall time in seconds of `--reps` interleaved runs of
`python -m kd_lightning.train ...` in a fresh process (what `kd-train` runs), each into its own folder.
The configuration error (`data.batch_size=0`) is found at stage 0, before torch or Lightning is imported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "config_error": ["data.batch_size=0"],  # exit 2, one line
    "misspelt_key": ["distill=kd", "distill.terms.kd.T=0"],  # exit 2, the valid keys listed
    "help": ["--help"],
}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.reps):
            for name, args in CASES.items():
                folder = [] if name == "help" else [f"hydra.run.dir={tmp}/{name}{rep}"]
                t0 = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-m", "kd_lightning.train", *args, *folder],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                )
                times[name].append(time.perf_counter() - t0)
                expected = 0 if name == "help" else 2
                if done.returncode != expected:
                    raise SystemExit(
                        f"{name}: exit {done.returncode}, expected {expected}\n{done.stderr[-2000:]}"
                    )
    for name, values in times.items():
        print(f"startup.{name}_s={spread(values)}")


if __name__ == "__main__":
    main()
