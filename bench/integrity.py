"""What the integrity checks cost: the data fingerprint of a generated ImageFolder of 100,000 small files,
and the per-block checksums of a 1 GB teacher-output store (computed when it is completed, checked when
it is opened).

    python bench/integrity.py [--files 100000] [--store-gb 1] [--reps 5] [--dir /tmp/somewhere]

Each figure is the median [min–max] of `--reps` repetitions (warm page cache: the files were just written
or read, as on every run but the first after a reboot). Fingerprint: the ImageFolder scan (one stat per
file, which the scan needed anyway) plus the digest. Store: crc32 of every 4 MiB block.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kd_lightning.data.fingerprint import content_digest, scan_tree
from kd_lightning.teachers.store import TapStore, store_key


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}–{max(values):.3f}]"


def make_folder(root: Path, files: int, classes: int = 100) -> None:
    payload = os.urandom(600)  # a small PNG's size; the scan reads no image
    for i in range(files):
        folder = root / f"class{i % classes:03d}"
        if i < classes:
            folder.mkdir(parents=True)
        (folder / f"{i:07d}.png").write_bytes(payload)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--store-gb", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write the generated files (default: a temp folder)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kd_integrity_", dir=a.dir))
    try:
        t0 = time.perf_counter()
        make_folder(work / "images", a.files)
        print(f"[fingerprint] generated {a.files:,} files in {time.perf_counter() - t0:.1f} s")
        scan, digest = [], []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            listing = scan_tree(work / "images", {".png"})
            t1 = time.perf_counter()
            content_digest({"train": listing})
            t2 = time.perf_counter()
            scan.append(t1 - t0)
            digest.append(t2 - t1)
        total = [s + d for s, d in zip(scan, digest, strict=True)]
        rglob = []  # what the ImageFolder scan cost before it kept the stats (Path.rglob per class, sorted)
        for _ in range(a.reps):
            t0 = time.perf_counter()
            classes = sorted(q.name for q in (work / "images").iterdir() if q.is_dir())
            n = sum(
                1
                for c in classes
                for q in sorted((work / "images" / c).rglob("*"))
                if q.suffix.lower() == ".png"
            )
            rglob.append(time.perf_counter() - t0)
        print(f"fingerprint.scan_s={spread(scan)}  fingerprint.digest_s={spread(digest)}")
        print(f"fingerprint.total_s={spread(total)}  (files={len(listing):,})")
        print(f"scan_without_stats_s={spread(rglob)}  (the rglob scan it replaces, files={n:,})")

        rows = int(a.store_gb * 1e9 / (4 * 1024))
        key = store_key({"bench": 1}, rows, "abc", "embed", "fc:input", "float32", "32")
        store = TapStore(key, (1024,), work / "stores", "bench-embed")
        for slots in torch.arange(rows).split(8192):  # written as a fill writes (each row's digest taken)
            store.write(slots, torch.randn(len(slots), 1024))
        gb = store.rows.numel() * 4 / 1e9
        complete, opened = [], []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            assert store.mark_complete()  # every row read back against its digest, every block's checksum
            complete.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            again = TapStore(key, (1024,), work / "stores", "bench-embed")  # checks every block (≤ 1 GiB)
            opened.append(time.perf_counter() - t0)
            assert again.complete
            del again
        print(f"\n[store checksums] {gb:.2f} GB, {store.n_blocks()} blocks of 4 MiB")
        print(f"store.checksum_on_complete_s={spread(complete)}  store.open_and_check_s={spread(opened)}")
        del store
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
