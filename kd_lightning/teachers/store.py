"""Teacher-output store: what a frozen teacher outputs for every training slot, computed once per teacher.

One store holds the outputs of ONE teacher for ONE tap (under consistent teaching, for every recorded
view): rows indexed by the training slot (kd_lightning.teachers.slots: sample·K + view). Its key is what the outputs depend on:
the data identity, the slot count, the teacher checkpoint's bytes (SHA-1), the tap (and the module it
names), the storage dtype and the trainer's precision. The teacher set, the student, the seed, the
distance and the method are not in it, so every job of a sweep over teacher subsets, seeds or methods
reuses the outputs of each teacher it shares with another job.

`teacher_cache.mode`:
- `memory`: one process — rows in RAM for this run; under DDP the store lives in the run folder
  (`<output_dir>/.kd/teacher_outputs`, removed after the fit) so that the ranks share it;
- `disk`: files under `teacher_cache.dir`, memory-mapped (`torch.from_file(shared=True)`): the ranks of a
  node share the page cache, and later runs read them without running the teacher.

Integrity. Next to `<name>.bin` (the rows) sit `<name>.digests` (each row's digest, taken as it is
written, compared with the file's rows before the store is sealed), `<name>.filled` (one byte per row, set after the row is
written) and `<name>.json` (the key, shape, dtype and `complete`). A store whose job was killed keeps its
filled rows and is completed by the next run; one whose meta does not match its key or size is
reported in one line and rebuilt; writers take `<name>.lock`, so parallel jobs never compute the same
rows twice (the others wait, then read).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from filelock import FileLock

from kd_lightning.errors import ConfigError, safe_name
from kd_lightning.files import atomic_write
from kd_lightning.plain import Plain, plain_list, plain_num, plain_str

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int16": torch.int16,  # class indices of top-K logits
    "int32": torch.int32,
}
FORMAT = "kd_lightning.teacher_store/2"  # /2: per-block checksums (stores of /1 have none: made anew)
BLOCK_BYTES = 1 << 22  # checksum granularity: 4 MiB of rows
VERIFY_AT_OPEN_BYTES = 1 << 30  # a complete store up to 1 GiB is checked whole when opened, a larger one by
# a sample of this many bytes of its blocks; `kd-cache --verify` checks every block (bench/integrity.py: cost)


class StoreSpaceError(ConfigError):
    """A disk store does not fit on its filesystem (raised before anything is computed)."""


_DIGEST_WEIGHTS: dict[int, torch.Tensor] = {}
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def row_digests(rows: torch.Tensor) -> torch.Tensor:
    """One int64 per row of a (n, ...) tensor: a weighted sum of its bytes, taken in the widest words that
    divide a row (a changed byte changes it; int64 arithmetic wraps), never 0 (0 stands for "no digest").
    Vectorised: a CRC per row would cost a Python call per row."""
    raw = rows.contiguous().view(torch.uint8).reshape(len(rows), -1)
    size, dtype = next((b, t) for b, t in _WORDS if raw.shape[1] % b == 0)
    words = raw.view(dtype).to(torch.int64) if dtype != torch.int64 else raw.view(torch.int64)
    n = words.shape[1]
    if n not in _DIGEST_WEIGHTS:
        # odd weights: a flipped bit (a change of ±2^k in a word) always changes the wrapped sum
        _DIGEST_WEIGHTS[n] = ((torch.arange(1, n + 1, dtype=torch.int64) * 2654435761) % 2147483647) | 1
    digest = (words * _DIGEST_WEIGHTS[n]).sum(1)
    return torch.where(digest == 0, 1, digest)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def reserve(path: Path, nbytes: int, label: str) -> None:
    """Allocate `nbytes` for `path` now (posix_fallocate), or raise StoreSpaceError naming the folder and the
    bytes needed. A filesystem that cannot reserve space (EOPNOTSUPP) keeps a sparse file, as before."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(1, int(nbytes)))
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        os.close(fd)
        fd = -1
        path.unlink(missing_ok=True)  # nothing half-allocated is left behind
        free = shutil.disk_usage(path.parent).free
        raise StoreSpaceError(
            f"teacher store {label} needs {human_size(nbytes)} in {path.parent} but that filesystem has "
            f"{human_size(free)} free ({os.strerror(e.errno)}): free space there, point teacher_cache.dir at a "
            "larger disk, or make the store smaller (teacher_cache.dtype=float16, teacher_cache.logits_topk=K "
            "for logit terms, or teacher_cache.mode=memory)"
        ) from None
    finally:
        if fd >= 0:
            os.close(fd)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """A teacher without a file of its own (random or torchvision weights): the digest of its weights."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())  # any dtype
    return h.hexdigest()


def store_key(
    data_identity: Mapping[str, Plain],
    slots: int,
    checkpoint_digest: str,
    tap: str,
    module: str,
    dtype: str,
    precision: str,
) -> dict[str, Plain]:
    """Everything one teacher's outputs for one tap depend on (and nothing they do not)."""
    return {
        "format": FORMAT,
        "data": dict(data_identity),
        "slots": int(slots),
        "teacher": checkpoint_digest,
        "tap": tap,
        "module": module,
        "dtype": dtype,
        "precision": str(precision),
    }


def key_digest(key: Mapping[str, object]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class OutputStore(Protocol):
    """What a run fills and reads, one teacher's outputs for one tap by training slot: a TapStore (every
    value) or a TopKLogitsStore (compact logits). TeacherOutputs and the precompute hold either."""

    key: dict[str, Plain]
    label: str
    folder: Path | None
    path: Path | None
    lock_path: Path | None

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def complete(self) -> bool: ...

    def refresh(self) -> None: ...

    def missing_slots(self) -> torch.Tensor: ...

    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None: ...

    def mark_complete(self) -> bool: ...

    def check(self, full: bool = True) -> list[int]: ...

    def read(self, slots: torch.Tensor, device: torch.device | str) -> torch.Tensor: ...

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def assemble(self, rows: tuple[torch.Tensor, ...], device: torch.device | str) -> torch.Tensor: ...

    def keep_on(self, device: torch.device) -> None: ...

    @property
    def nbytes(self) -> int: ...

    def files(self) -> list[str]: ...

    def moved(self, folder: Path) -> OutputStore: ...

    def remove(self) -> None: ...


class _StoreFiles(NamedTuple):
    rows: Path
    meta: Path
    filled: Path
    digests: Path
    lock: Path


class TapStore:
    """The outputs of one teacher for one tap: `rows[slot]`, a filled flag per slot, in RAM or in a file."""

    def __init__(self, key: Mapping[str, Plain], shape: tuple[int, ...], folder: Path | None, label: str):
        self.key, self.label = dict(key), safe_name("a teacher store's name (teacher-tap)", label)
        self.shape = (int(plain_num(key["slots"], "slots")), *shape)
        self.dtype = DTYPES[plain_str(key["dtype"], "dtype")]
        self.folder = folder
        name = f"{label}-{key_digest(key)}"
        self.path = folder / f"{name}.bin" if folder else None
        self.meta_path = folder / f"{name}.json" if folder else None
        self.filled_path = folder / f"{name}.filled" if folder else None
        self.digest_path = folder / f"{name}.digests" if folder else None  # each row's, as it was written
        self.lock_path = folder / f"{name}.lock" if folder else None
        self._kept: torch.Tensor | None = None  # a copy of the rows on the training device (keep_on)
        self._open()

    # --- files -----------------------------------------------------------------------------------
    def _numel(self) -> int:
        return math.prod(self.shape)

    def _files(self) -> _StoreFiles:
        """The store's files (a store in RAM has none)."""
        if self.folder is None or self.path is None or self.meta_path is None:
            raise RuntimeError(f"teacher store {self.label} is held in memory: it has no files")
        assert self.filled_path and self.digest_path and self.lock_path  # set together in __init__
        return _StoreFiles(self.path, self.meta_path, self.filled_path, self.digest_path, self.lock_path)

    def _open(self) -> None:
        if self.folder is None:
            self.rows = torch.empty(self.shape, dtype=self.dtype)
            self.filled = torch.zeros(self.shape[0], dtype=torch.uint8)
            self._complete = False
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        # Under the store's lock: the ranks of a DDP job (and parallel jobs) open a store at the same time,
        # and exactly one of them may create (or rebuild) its files; the others then map the same files.
        files = self._files()
        with FileLock(str(files.lock)):
            self._open_files(files)

    def _open_files(self, files: _StoreFiles) -> None:
        meta = self._read_meta()
        expected = self._numel() * self.dtype.itemsize
        if meta is not None and (
            meta.get("key") != self.key
            or list(plain_list(meta.get("shape"), "shape")) != list(self.shape)
            or not files.rows.is_file()
            or files.rows.stat().st_size != expected
            or not files.filled.is_file()
            or files.filled.stat().st_size != self.shape[0]
        ):
            log.warning("teacher store %s does not match its key or size; rebuilding it", files.rows)
            meta = None
        if meta is None:
            for p in (files.rows, files.filled, files.digests):
                p.unlink(missing_ok=True)
        # Every block of both files is allocated before they are mapped: a memory map that the disk
        # cannot back kills the process with SIGBUS on first touch, with no error and no results.json.
        reserve(files.rows, expected, self.label)
        reserve(files.filled, self.shape[0], self.label)
        reserve(files.digests, 8 * self.shape[0], self.label)  # zeros: no digest (rows of an older store)
        self.rows = torch.from_file(str(files.rows), shared=True, size=self._numel(), dtype=self.dtype).view(
            self.shape
        )
        self.digests = torch.from_file(str(files.digests), shared=True, size=self.shape[0], dtype=torch.int64)
        self.filled = torch.from_file(str(files.filled), shared=True, size=self.shape[0], dtype=torch.uint8)
        if meta is None:
            self._write_meta(complete=False)
        self._complete = bool(meta and meta.get("complete"))
        if meta is not None and self._complete:
            self._sums = [int(plain_num(v, "sums")) for v in plain_list(meta.get("sums"), "sums")]
            self.check(full=self.rows.numel() * self.dtype.itemsize <= VERIFY_AT_OPEN_BYTES)

    def _read_meta(self) -> dict[str, Plain] | None:
        path = self._files().meta
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("teacher store meta %s is unreadable; rebuilding the store", self.meta_path)
            return None
        return meta if isinstance(meta, dict) else None

    def _write_meta(self, complete: bool, sums: list[int] | None = None) -> None:
        meta = {"key": self.key, "shape": list(self.shape), "dtype": self.key["dtype"], "complete": complete}
        if sums is not None:
            meta.update(block_rows=self.block_rows(), sums=sums)
        text = json.dumps(meta, indent=1, sort_keys=True)
        atomic_write(self._files().meta, lambda tmp: tmp.write_text(text))

    def refresh(self) -> None:
        """Re-read the completion flag (another process may have finished the store)."""
        if self.meta_path is not None:
            meta = self._read_meta()
            self._complete = bool(meta and meta.get("complete") and meta.get("key") == self.key)
            self._sums = [int(plain_num(v, "sums")) for v in plain_list((meta or {}).get("sums"), "sums")]

    # --- rows ----------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self._complete

    def missing_slots(self) -> torch.Tensor:
        """Slots not written yet (int64, ascending)."""
        if self._complete:
            return torch.zeros(0, dtype=torch.long)
        return (self.filled == 0).nonzero().flatten()

    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Rows first (and, for a file, each row's digest as it is written), then their filled flags: a kill
        in between leaves the rows to be recomputed."""
        idx = slots.cpu()
        rows = values.detach().to("cpu", self.dtype)
        self.rows[idx] = rows
        if self.path is not None:
            self.digests[idx] = row_digests(rows)
        self.filled[idx] = 1

    def mark_complete(self) -> bool:
        """Seal a filled store: its rows are read back and compared with what was written (a byte that
        changed on its way to the disk is never sealed into the checksums); rows that differ are marked
        missing and False is returned, for the caller to compute them again."""
        if not bool((self.filled == 1).all()):
            raise RuntimeError(
                f"teacher store {self.path or self.label} is not filled; cannot mark it complete"
            )
        if self.meta_path is not None:
            bad = self.rows_not_as_written()
            if len(bad):
                log.warning(
                    "teacher store %s: %d row(s) read back otherwise than they were written (e.g. slot %d); "
                    "computing them again",
                    self.path,
                    len(bad),
                    int(bad[0]),
                )
                self.filled[bad] = 0
                return False
            self._sums = self.checksums()
            self._write_meta(complete=True, sums=self._sums)
        self._complete = True
        return True

    def rows_not_as_written(self) -> torch.Tensor:
        """Slots whose rows in the file do not match the digest taken when they were written (or that have
        none: written by an older version), read back block by block."""
        step = self.block_rows()
        bad = []
        for start in range(0, self.shape[0], step):
            stored = self.digests[start : start + step]
            differ = (row_digests(self.rows[start : start + step]) != stored) | (stored == 0)
            bad.append(differ.nonzero().flatten() + start)
        return torch.cat(bad) if bad else torch.zeros(0, dtype=torch.long)

    # --- integrity ----------------------------------------------------------------------------
    def block_rows(self) -> int:
        """Rows per checksummed block (4 MiB of rows, at least one row)."""
        row = max(1, math.prod(self.shape[1:]) * self.dtype.itemsize)
        return max(1, BLOCK_BYTES // row)

    def n_blocks(self) -> int:
        return math.ceil(self.shape[0] / self.block_rows())

    def checksums(self, blocks: list[int] | None = None) -> list[int]:
        """crc32 of each block's bytes (all blocks, or those listed)."""
        flat = self.rows.view(-1).view(torch.uint8).numpy()
        step = self.block_rows() * (flat.size // max(1, self.shape[0]))
        chosen = range(self.n_blocks()) if blocks is None else blocks
        return [zlib.crc32(flat[b * step : (b + 1) * step].data) for b in chosen]

    def check(self, full: bool = True) -> list[int]:
        """Verify the rows of a complete store against the checksums recorded when it was completed (every
        block, or a random sample of VERIFY_AT_OPEN_BYTES); the blocks that differ are reported in one
        line and their rows marked missing, so the next precompute recomputes them. Returns those blocks."""
        if self.path is None or not self._complete:
            return []
        n = self.n_blocks()
        if len(getattr(self, "_sums", [])) != n:
            log.warning("teacher store %s has no checksums for its rows; recomputing it", self.path)
            bad = list(range(n))
        else:
            if full:
                blocks = list(range(n))
            else:
                per = max(
                    1,
                    VERIFY_AT_OPEN_BYTES // (self.block_rows() * self.rows[0].numel() * self.dtype.itemsize),
                )
                blocks = sorted(torch.randperm(n)[:per].tolist())
            sums = self.checksums(blocks)
            bad = [b for b, s in zip(blocks, sums, strict=True) if s != self._sums[b]]
            if bad:
                r = self.block_rows()
                spans = ", ".join(f"{b * r}-{min((b + 1) * r, self.shape[0]) - 1}" for b in bad[:6])
                log.warning(
                    "teacher store %s: %d of %d blocks do not match their checksums (rows %s%s); recomputing "
                    "those rows",
                    self.path,
                    len(bad),
                    n,
                    spans,
                    ", ..." if len(bad) > 6 else "",
                )
        if bad:
            self.repaired = [*getattr(self, "repaired", []), *bad]
            r = self.block_rows()
            for b in bad:
                self.filled[b * r : (b + 1) * r] = 0
            self._write_meta(complete=False)
            self._complete = False
        return bad

    # --- reading: `gather` where the rows live (a copy on the training device, or the host's rows in the
    # loader's workers), `assemble` on the training device; `read` is both in one -----------------------
    def keep_on(self, device: torch.device) -> None:
        """Keep a copy of the (complete) rows on `device`: a batch's rows are then gathered there."""
        self._kept = self.rows.to(device)

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.dtype.itemsize

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch's rows as stored, from the device copy when there is one (`slots` already there)."""
        rows = self.rows if self._kept is None else self._kept
        return (rows[slots.to(rows.device)],)

    def assemble(self, rows: tuple[torch.Tensor, ...], device: torch.device | str) -> torch.Tensor:
        """Gathered rows on the device as float32 (the losses compute in float32)."""
        return rows[0].to(device, non_blocking=True).float()

    def read(self, slots: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        return self.assemble(self.gather(slots), device)

    def files(self) -> list[str]:
        return [str(self.path)] if self.path is not None else []

    def moved(self, folder: Path) -> TapStore:
        """The same (empty) store as files in `folder` (RAM stores shared by DDP ranks)."""
        return TapStore(self.key, self.shape[1:], folder, self.label)

    def remove(self) -> None:
        for p in (self.path, self.filled_path, self.digest_path, self.meta_path, self.lock_path):
            if p is not None:
                p.unlink(missing_ok=True)


class TopKLogitsStore:
    """Compact logits: the K largest logits of each slot, their class indices and the log-sum-exp of all
    of them (Shen & Xing's FKD keeps the top-K soft labels the same way). `read` rebuilds full logits: the
    K kept as they were, every other class at one value chosen so that, at temperature 1, the distribution
    is exact on the K classes and spreads the remaining probability mass evenly over the others. At
    another temperature the tail's shape is lost; the error this adds to each loss is measured in
    docs/STORE.md and bounded by tests/test_teacher_cache.py. Same interface as TapStore."""

    def __init__(self, key: Mapping[str, Plain], classes: int, k: int, folder: Path | None, label: str):
        self.classes, self.k, self.base_key = int(classes), int(k), dict(key)
        index_dtype = "int16" if self.classes < 2**15 else "int32"
        self.values = TapStore(
            {**key, "topk": self.k, "part": "values"}, (self.k,), folder, f"{label}-top{k}"
        )
        self.indices = TapStore(
            {**key, "topk": self.k, "part": "indices", "dtype": index_dtype},
            (self.k,),
            folder,
            f"{label}-top{k}i",
        )
        self.lse = TapStore(
            {**key, "topk": self.k, "part": "lse", "dtype": "float32"}, (1,), folder, f"{label}-lse"
        )
        self.parts = (self.values, self.indices, self.lse)
        self.key, self.label, self.folder = self.values.key, label, folder
        self.shape = (self.values.shape[0], self.classes)
        self.path, self.lock_path = self.values.path, self.values.lock_path

    @property
    def complete(self) -> bool:
        return all(p.complete for p in self.parts)

    def refresh(self) -> None:
        for p in self.parts:
            p.refresh()

    def missing_slots(self) -> torch.Tensor:
        return torch.unique(torch.cat([p.missing_slots() for p in self.parts]))

    def write(self, slots: torch.Tensor, logits: torch.Tensor) -> None:
        logits = logits.detach().float()
        top = logits.topk(self.k, dim=1)
        self.values.write(slots, top.values)
        self.indices.write(slots, top.indices)
        self.lse.write(slots, torch.logsumexp(logits, 1, keepdim=True))

    def mark_complete(self) -> bool:
        return all([p.mark_complete() for p in self.parts])  # every part read back, not only up to the first

    def check(self, full: bool = True) -> list[int]:
        return [b for p in self.parts for b in p.check(full)]

    @property
    def repaired(self) -> list[int]:
        return [b for p in self.parts for b in getattr(p, "repaired", [])]

    def keep_on(self, device: torch.device) -> None:
        for p in self.parts:
            p.keep_on(device)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(p.gather(slots)[0] for p in self.parts)

    def assemble(self, rows: tuple[torch.Tensor, ...], device: torch.device | str) -> torch.Tensor:
        values, indices, lse = (r.to(device, non_blocking=True) for r in rows)
        return rebuild_logits(values.float(), indices.long(), lse.float(), self.classes)

    def read(self, slots: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        return self.assemble(self.gather(slots), device)

    def files(self) -> list[str]:
        return [f for p in self.parts for f in p.files()]

    def moved(self, folder: Path) -> TopKLogitsStore:
        return TopKLogitsStore(self.base_key, self.classes, self.k, folder, self.label)

    def remove(self) -> None:
        for p in self.parts:
            p.remove()


def rebuild_logits(
    values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, classes: int
) -> torch.Tensor:
    """Full logits from the top-K (values, indices) and the log-sum-exp of all logits (see TopKLogitsStore)."""
    k = values.shape[1]
    kept = torch.exp(values - lse).sum(1, keepdim=True)  # probability of the K classes at temperature 1
    rest = (1.0 - kept).clamp_min(1e-12) / max(1, classes - k)
    filler = torch.log(rest) + lse
    out = filler.expand(len(values), classes).clone()
    return out.scatter(1, indices, values)


def stored_as(t: torch.Tensor, dtype: str = "float32", topk: int | None = None) -> torch.Tensor:
    """What a store gives back for outputs `t` (a batch; logits when `topk` is set), as float32: the error
    a compact store adds to a loss is the loss of this minus the loss of `t`."""
    t = t.detach().float()
    if topk is not None:
        top = t.topk(topk, dim=1)
        return rebuild_logits(top.values, top.indices, torch.logsumexp(t, 1, keepdim=True), t.shape[1])
    return t.to(DTYPES[dtype]).float()
