"""Teacher-output cache: the frozen teachers' tap outputs for every training sample, computed once.

Teachers never change, so without augmentation their outputs for a sample are the same every epoch.
The cache fills during the first epoch (live teachers, outputs stored by sample index) and is read
afterwards. `mode: disk` also saves the complete cache under `<cache_dir>/teacher_outputs/<key>.pt` and
memory-maps it in later runs (sweeps over seeds, distances, weights or students with the same teachers
then never run a teacher on the training set again).

The key covers everything the outputs depend on: the data identity (dataset, split seed, subset,
normalisation, sample count), each teacher's checkpoint *bytes* (SHA-1), the taps read, and the
trainer's precision; change any of them and the old file is simply not used. With augmentation the
cached outputs would belong to other views of the samples: the cache is switched off and the log says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kd_lightning.files import atomic_write

log = logging.getLogger(__name__)


Features = dict[str, dict[str, torch.Tensor]]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(
    data_identity: Mapping[str, Any],
    num_samples: int,
    checkpoints: Mapping[str, str],
    taps: Mapping[str, list[str]],
    precision: str,
) -> str:
    payload = {
        "data": data_identity,
        "n": num_samples,
        "teachers": {m: file_digest(p) for m, p in sorted(checkpoints.items())},
        "taps": {m: sorted(t) for m, t in sorted(taps.items())},
        "precision": str(precision),
        "format": 1,
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TeacherOutputCache:
    """`get(index)` → the teachers' features for those samples, or None if any is missing; `put` stores.

    A batch with some samples missing runs the teachers on those samples only (teachers are in eval
    mode, so a sample's outputs do not depend on the rest of its batch)."""

    def __init__(self, num_samples: int, key: str, path: Path | None = None):
        self.n, self.key, self.path = int(num_samples), key, path
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.filled = torch.zeros(self.n, dtype=torch.bool)
        self.hits = self.misses = 0
        if path is not None and path.is_file():
            self._load(path)

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def _load(self, path: Path) -> None:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(obj, dict) or obj.get("key") != self.key or int(obj.get("n", -1)) != self.n:
            log.warning("teacher cache %s does not match this run; ignoring it", path)
            return
        self.tensors = obj["tensors"]
        self.filled[:] = True
        log.info("teacher outputs read from %s (%d samples)", path, self.n)

    def missing(self, index: torch.Tensor) -> torch.Tensor:
        """Bool mask on the CPU: which of these samples the cache does not hold yet."""
        return ~self.filled[index.cpu()]

    def get(self, index: torch.Tensor, device: torch.device) -> Features | None:
        idx = index.cpu()
        if not self.tensors or not bool(self.filled[idx].all()):
            self.misses += 1
            return None
        self.hits += 1
        return {
            m: {tap: t[idx].to(device, non_blocking=True) for tap, t in taps.items()}
            for m, taps in self.tensors.items()
        }

    def put(self, index: torch.Tensor, feats: Features) -> None:
        idx = index.cpu()
        for m, taps in feats.items():
            store = self.tensors.setdefault(m, {})
            for tap, v in taps.items():
                if tap not in store:
                    store[tap] = torch.empty((self.n, *v.shape[1:]), dtype=v.dtype)
                store[tap][idx] = v.detach().to("cpu")
        self.filled[idx] = True

    def save(self) -> Path | None:
        """Write the complete cache (rank 0, mode disk); atomic, so readers never see half a file."""
        if self.path is None or not self.complete or self.path.is_file():
            return None
        payload = {"key": self.key, "n": self.n, "tensors": self.tensors}
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))
        log.info("teacher outputs saved to %s", self.path)
        return self.path
