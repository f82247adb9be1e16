"""What a cache made from data is keyed by: the data's content, not only the config that names it.

Fitted teachers, pre-trained source models and teacher-output stores depend on the samples they were
made from. For data generated in memory (digits, MNIST-1D, synthetic) the generating config is that
identity. Data read from disk gets a *fingerprint*: the sorted list of its files relative to their root,
each with its size and modification time (ns), and the bytes of a few files spread over the list (a
second guard for copies that keep names, sizes and times). The root itself is not part of it, so a
folder that is moved or copied with its times (`mv`, `rsync -a`, `cp -a`) still hits its caches, while
another folder, or the same folder with one image fixed in place, never does.

Cost: one `stat` per file, which the ImageFolder scan does anyway (see `bench/fingerprint.py` for the
time on 100,000 files), plus 16 reads of at most 64 KiB.

`note_changes` keeps a small manifest per (dataset, root) under the cache, so that the run that refits
after a change can say why: "data changed in ...: 3 files modified, 0 added, 0 removed".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_lightning.plain import Plain

log = logging.getLogger(__name__)

SAMPLE_FILES = 16
SAMPLE_BYTES = 1 << 16


@dataclass(frozen=True)
class FileListing:
    """Files of one dataset: `rel` (sorted names relative to `root`), their sizes and times."""

    root: Path
    rel: list[str]
    size: np.ndarray  # int64
    mtime: np.ndarray  # int64, ns

    @staticmethod
    def of(root: Path, rel: Iterable[str]) -> FileListing:
        rel = list(rel)
        stats = [os.stat(root / r) for r in rel]
        return FileListing(
            root,
            rel,
            np.array([s.st_size for s in stats], dtype=np.int64),
            np.array([s.st_mtime_ns for s in stats], dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.rel)

    def digest(self) -> str:
        """sha1 of every (name, size, time) in order, then of a sample of the files' first bytes."""
        h = hashlib.sha1()
        h.update("\0".join(self.rel).encode())
        h.update(self.size.tobytes())
        h.update(self.mtime.tobytes())
        n = len(self.rel)
        for i in sorted({int(i) for i in np.linspace(0, n - 1, min(n, SAMPLE_FILES))}) if n else []:
            with open(self.root / self.rel[i], "rb") as f:
                h.update(f.read(SAMPLE_BYTES))
        return h.hexdigest()

    def keys(self, tag: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(a 64-bit hash of each `tag/name`, a 64-bit hash of its size and time), for the change counts."""
        names = np.array(
            [
                int.from_bytes(hashlib.blake2b(f"{tag}/{r}".encode(), digest_size=8).digest(), "little")
                for r in self.rel
            ],
            dtype=np.uint64,
        )
        stats = self.size.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ self.mtime.astype(np.uint64)
        return names, stats


# A dataset's files: one listing per root it reads ("train", "test", or "" for a single root).
Listings = dict[str, FileListing]


def content_digest(parts: Listings) -> str:
    """The fingerprint that keys caches: every part's digest, with its tag and file count."""
    h = hashlib.sha1()
    for tag in sorted(parts):
        h.update(f"{tag}\0{len(parts[tag])}\0{parts[tag].digest()}\0".encode())
    return h.hexdigest()


def scan_tree(root: Path, suffixes: Iterable[str]) -> FileListing:
    """Every file under `root` whose suffix is one of `suffixes` (any case), with its size and time, in
    the order of `sorted(root.rglob("*"))` (one `stat` per file, no second walk)."""
    wanted = {s.lower() for s in suffixes}
    found: list[tuple[tuple[str, ...], str, int, int]] = []

    def walk(folder: str, prefix: str) -> None:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_dir():
                    walk(e.path, f"{prefix}{e.name}/")
                elif os.path.splitext(e.name)[1].lower() in wanted:
                    st = e.stat()
                    rel = prefix + e.name
                    found.append((tuple(rel.split("/")), rel, st.st_size, st.st_mtime_ns))

    walk(str(root), "")
    found.sort()
    return FileListing(
        root,
        [f[1] for f in found],
        np.array([f[2] for f in found], dtype=np.int64),
        np.array([f[3] for f in found], dtype=np.int64),
    )


def note_changes(name: str, parts: Listings, cache_dir: str | Path) -> str | None:
    """Compare `parts` with the manifest of the last run that read the same roots; log and return what
    changed (None when nothing did or there was no earlier run), then record these listings."""
    where = ", ".join(str(parts[t].root) for t in sorted(parts))
    tag = hashlib.sha1(where.encode()).hexdigest()[:12]
    folder = Path(cache_dir) / "data_manifests"
    path, meta_path = folder / f"{name}-{tag}.npz", folder / f"{name}-{tag}.json"
    digest = content_digest(parts)
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    except (OSError, ValueError):
        meta = None
    if meta is not None and meta.get("digest") == digest:
        return None
    keyed = [parts[t].keys(t) for t in sorted(parts)]
    names = np.concatenate([k[0] for k in keyed]) if keyed else np.zeros(0, np.uint64)
    stats = np.concatenate([k[1] for k in keyed]) if keyed else np.zeros(0, np.uint64)
    message = None
    if meta is not None and path.is_file():
        with np.load(path) as old:
            old_names, old_stats = old["names"], old["stats"]
        common, new_i, old_i = np.intersect1d(names, old_names, return_indices=True)
        modified = int((stats[new_i] != old_stats[old_i]).sum())
        added, removed = len(names) - len(common), len(old_names) - len(common)
        if modified or added or removed:
            how = f"{modified} files modified, {added} added, {removed} removed"
        else:
            how = "the same names, sizes and times, but other contents"
        message = (
            f"data changed in {where} since {meta.get('time')}: {how}; teachers and teacher outputs made from "
            "the earlier files are not reused (their keys hold the data's fingerprint), so they are made anew"
        )
        log.warning(message)
    from kd_lightning.files import atomic_write

    atomic_write(path, lambda tmp: np.savez(tmp, names=names, stats=stats), suffix=".npz")
    record = {"digest": digest, "files": int(len(names)), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(record)))
    return message


# Data settings that do not change which samples a cache was made from: loader settings, and the folders
# themselves (what they hold is the fingerprint's part of the key).
NOT_IDENTITY = (
    "batch_size", "eval_batch_size", "num_workers", "on_device", "download", "root", "test_root", "cache_dir",
)  # fmt: skip


NO_AUGMENT = {"crop_padding": 0, "hflip": False, "views": None}  # data.augment that augments nothing


def data_key(data_cfg: Mapping[str, Plain], content: str | None = None) -> dict[str, Plain]:
    """What decides the samples a fitted teacher, a pre-trained model or a teacher store was made from:
    the data config without its loader settings and folders, and the fingerprint of the files of data
    read from disk (`content`, from `TensorDataModule.content_fingerprint`). Generated data has none: its
    config is its identity, and its keys are those of earlier versions."""
    key = {k: v for k, v in data_cfg.items() if k not in NOT_IDENTITY}
    augment = key.get("augment")
    if isinstance(augment, Mapping) and all(augment.get(k, d) == d for k, d in NO_AUGMENT.items()):
        key["augment"] = None  # spelt out with its defaults (conf/data/imagefolder.yaml): the same data
    if content is not None:
        key["content"] = content
    return key
