"""A callback for bench/scale.py, loaded by kd-train from the command line (PYTHONPATH=bench):
+callbacks.probe._target_=probes.Probe. Each rank appends one JSON line to $KD_BENCH_PROBES/rank<r>.jsonl
at the end of the fit: the wall time of every training epoch and the process's resident memory, split
into its own (anonymous) pages and file-backed pages (a memory-mapped store is file-backed and shared
by the ranks of a node through the page cache)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytorch_lightning as pl


def resident_kib() -> dict[str, int]:
    """RssAnon and RssFile of this process, in KiB (Linux /proc)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class Probe(pl.Callback):
    def __init__(self) -> None:
        self.epochs: list[float] = []
        self._t = 0.0

    def on_train_epoch_start(self, trainer, module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.epochs.append(time.perf_counter() - self._t)

    def on_fit_end(self, trainer, module) -> None:
        folder = Path(os.environ["KD_BENCH_PROBES"])
        folder.mkdir(parents=True, exist_ok=True)
        record = {"epochs": self.epochs, **resident_kib(), "rank": trainer.global_rank}
        with open(folder / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
