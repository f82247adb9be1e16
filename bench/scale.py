"""make bench (second part): the teacher-output stores at the scale users run, through the real `kd-train`.

  sweep.teacher_passes   sweep=teacher_subsets over 3 teachers (7 jobs) with disk stores: the teacher
                         forward samples of all jobs summed ÷ (3 × train samples). Target 1.00 (each
                         teacher runs once on the training set, whatever the subsets). A count, not a time.
  ddp2.kd_over_student   2-process DDP (gloo, CPU), stores filled: Hinton-KD epoch time ÷ student-only
                         epoch time, from epoch 2 (gallo2020's data, teacher and student, `distill=kd`;
                         batch 32, 113 steps per rank and epoch, so that an epoch is steps, not set-up).
                         Target ≤ 1.10: once the stores are filled no rank runs a teacher, and what is
                         left is the store lookup and the KL term.
  ddp2.gallo2020_over_student  the same with gallo2020's own term (MSE through a linear adapter 100→320):
                         the adapter is part of the method and costs about twice the student MLP's
                         multiply-adds (15k per sample), so this ratio measures the method, not the store.
  store.rss_growth       resident memory of a rank's own pages (RssAnon) when the training set doubles,
                         with the memory-mapped disk store (the store's pages are file-backed and shared).
                         Target about 1.0; `store.rss_growth_memory` shows the same with RAM stores.
Each timed figure is the median [min–max] of `--reps` interleaved repetitions.
Usage: python bench/scale.py [--reps 5] [--only sweep,ddp2,rss]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "print_summary=false"]


def kd_train(*args: str, env: dict | None = None, cwd: Path = ROOT) -> None:
    cmd = [sys.executable, "-m", "kd_lightning.train", *args]
    full = {**os.environ, "PYTHONPATH": str(ROOT / "bench"), "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"kd-train {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def probes(folder: Path) -> list[dict]:
    return [
        json.loads(line) for f in sorted(folder.glob("rank*.jsonl")) for line in f.read_text().splitlines()
    ]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}–{max(values):.3f}]"


def sweep_teacher_passes(work: Path) -> None:
    sweep = work / "sweep"
    kd_train(
        "-m", "experiment=landro2021", "sweep=teacher_subsets", "trainer.max_epochs=2",
        "teacher_cache.mode=disk", f"teacher_cache.dir={work / 'stores'}", "callbacks=none", *QUIET,
        f"hydra.sweep.dir={sweep}", "hydra/launcher=local", "hydra.launcher.n_jobs=2",
    )  # fmt: skip
    rs = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    total = sum(r["teacher_forward_samples"] for r in rs)
    n = rs[0]["train_samples"]
    print(f"  {len(rs)} jobs, {n} train samples, {total} teacher forward samples in all")
    print(f"sweep.teacher_passes={total / (3 * n):.3f}")


def ddp2_kd_over_student(work: Path, reps: int) -> None:
    base = [
        "experiment=gallo2020", "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_epochs=8",
        "data.batch_size=32",
        "teacher_cache.mode=disk", f"teacher_cache.dir={work / 'stores'}", "callbacks=none", *QUIET,
        "+callbacks.probe._target_=probes.Probe",
    ]  # fmt: skip
    ratios: dict[str, list[float]] = {"kd": [], "gallo2020": []}
    for rep in range(reps):
        epoch = {}
        for name, extra in (
            ("kd", ["distill=kd"]),
            ("gallo2020", []),
            ("student", ["teachers=none", "distill=none"]),
        ):
            folder = work / f"ddp-{name}-{rep}"
            kd_train(
                *base, *extra, f"hydra.run.dir={folder}", env={"KD_BENCH_PROBES": str(folder / "probes")}
            )
            times = [t for r in probes(folder / "probes") for t in r["epochs"][1:]]  # from epoch 2
            epoch[name] = statistics.median(times)
        for name in ratios:
            ratios[name].append(epoch[name] / epoch["student"])
    print(f"ddp2.kd_over_student={spread(ratios['kd'])}")
    print(f"ddp2.gallo2020_over_student={spread(ratios['gallo2020'])}   (the method's adapter included)")


def rss_growth(work: Path, reps: int) -> None:
    """Synthetic data with 1000 classes: the store (1000 logits per sample) dominates what grows."""
    common = [
        "data=synthetic", "data.num_classes=1000", "data.dim=16", "data.num_test=1000", "data.batch_size=256",
        "teachers=synthetic_mlp", "teachers.members.mlp64.fit.max_epochs=1", "student=mlp", "distill=kd",
        "trainer.max_epochs=1", "callbacks=none", *QUIET, "+callbacks.probe._target_=probes.Probe",
    ]  # fmt: skip
    for mode in ("disk", "memory"):
        growth = []
        for rep in range(reps):
            anon = {}
            for n in (20000, 40000):
                folder = work / f"rss-{mode}-{n}-{rep}"
                kd_train(
                    *common, f"data.num_train={n}", f"teacher_cache.mode={mode}",
                    f"teacher_cache.dir={work / 'stores'}", f"hydra.run.dir={folder}",
                    env={"KD_BENCH_PROBES": str(folder / "probes")},
                )  # fmt: skip
                anon[n] = probes(folder / "probes")[0]["RssAnon"]
            growth.append(anon[40000] / anon[20000])
        label = "store.rss_growth" if mode == "disk" else "store.rss_growth_memory"
        print(f"{label}={spread(growth)}   (RssAnon at 40k / 20k samples; 1000 float32 logits per sample)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", default="sweep,ddp2,rss")
    a = p.parse_args()
    only = set(a.only.split(","))
    with tempfile.TemporaryDirectory(prefix="kd_bench_") as tmp:
        work = Path(tmp)
        if "sweep" in only:
            sweep_teacher_passes(work)
        if "ddp2" in only:
            ddp2_kd_over_student(work, a.reps)
        if "rss" in only:
            rss_growth(work, a.reps)


if __name__ == "__main__":
    main()
