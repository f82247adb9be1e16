"""Packed students on the CPU: the 7-job teacher-subset sweep of experiment=landro2021, packed against one by one.

    python bench/packed.py [--epochs 60] [--reps 3] [--samples 10000] [--out FILE]

Each repetition runs the sweep `kd-train -m experiment=landro2021 sweep=teacher_subsets` twice, interleaved:
with Hydra's basic launcher (the 7 jobs one after another) and with hydra/launcher=packed (the 7 students
fused into one fit, the 3 teachers run once per batch). The teachers are fitted before the first timed
sweep (a one-epoch sweep fills the bench's own cache), so both sides load them. Printed per launcher, as
median [min-max] over the repetitions:
  wall_s        the sweep's wall time (start-up, data, teachers' stores, fits, tests: what a user waits for)
  images_per_s  the 7 students' training samples (train split × epochs × 7) over wall_s
and the packed sweep's wall time over the basic one's (`packed_over_basic`, the issue's target <= 0.5), and
the largest difference of a job's test accuracy between the two sweeps of the last repetition (equal jobs,
equal accuracies: float rounding aside, 0). The configured callbacks stay (each job alone writes its
checkpoints every epoch; the pack writes its own); no logger on either side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from multirun import run_quietly  # noqa: E402


def sweep(launcher: str, out: Path, cache: Path, epochs: int, samples: int) -> tuple[float, dict[str, dict]]:
    args = [
        "-m", "experiment=landro2021", "sweep=teacher_subsets", f"hydra/launcher={launcher}",
        f"trainer.max_epochs={epochs}", f"data.num_samples={samples}", "logger=none",
        "trainer.enable_progress_bar=false", "print_summary=false", f"hydra.sweep.dir={out}",
    ]  # fmt: skip
    os.environ["KD_CACHE_DIR"] = str(cache)  # the bench's own cache: the teachers it fitted
    t0 = time.perf_counter()
    code = run_quietly([sys.executable, "-m", "kd_lightning.train", *args], "bench-packed")
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"sweep with hydra/launcher={launcher} failed (its stderr above)")
    results = {}
    for path in sorted(out.glob("*/results.json")):
        r = json.loads(path.read_text())
        results[r["teacher_set"]] = r
    if len(results) != 7 or any(r["status"] != "ok" for r in results.values()):
        raise SystemExit(f"hydra/launcher={launcher}: expected 7 finished jobs in {out}")
    return wall, results


def fmt(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=60, help="trainer.max_epochs (the experiment's: 60)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--samples", type=int, default=10000, help="data.num_samples (MNIST-1D's default: 10000)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp), Path(tmp) / "cache"
        sweep("basic", root / "warmup", cache, 1, a.samples)  # fits the three teachers into the bench's cache
        walls: dict[str, list[float]] = {"basic": [], "packed": []}
        last: dict[str, dict[str, dict]] = {}
        for rep in range(a.reps):
            order = ("basic", "packed") if rep % 2 == 0 else ("packed", "basic")
            for launcher in order:
                wall, last[launcher] = sweep(launcher, root / f"{launcher}-{rep}", cache, a.epochs, a.samples)
                walls[launcher].append(wall)
                print(f"rep {rep + 1}/{a.reps} {launcher}: {wall:.1f} s", flush=True)
    train = next(iter(last["basic"].values()))["train_samples"]
    images = 7 * train * a.epochs
    diff = max(abs(last["basic"][k]["test_acc"] - last["packed"][k]["test_acc"]) for k in last["basic"])
    ratio = [p / b for p, b in zip(walls["packed"], walls["basic"], strict=True)]
    figures = {
        "epochs": a.epochs,
        "train_samples": train,
        "wall_s": {k: v for k, v in walls.items()},
        "images_per_s": {k: [images / w for w in v] for k, v in walls.items()},
        "packed_over_basic": ratio,
        "max_test_acc_difference": diff,
        "test_acc": {k: {n: r["test_acc"] for n, r in v.items()} for k, v in last.items()},
    }
    print(f"\nlandro2021, 7 teacher subsets, {a.epochs} epochs, {train} training samples, {a.reps} reps:")
    for launcher in ("basic", "packed"):
        print(
            f"  {launcher:6s}  wall_s {fmt(walls[launcher])}  images_per_s "
            f"{fmt(figures['images_per_s'][launcher], 0)}"  # type: ignore[index]
        )
    print(f"  packed_over_basic {fmt(ratio, 3)}   max test-acc difference {diff:.4f}")
    if a.out is not None:
        a.out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
