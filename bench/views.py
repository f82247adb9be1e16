"""Recorded random views against live teachers, on the ImageNet recipe: what the store saves under
RandomResizedCrop + flip.

    python bench/views.py [--images 2000] [--size 64] [--views 4] [--epochs 3] [--reps 3]
                          [--replays per_sample,batched]

A generated ImageFolder of `--images` PNGs of size × size (1000 class folders, the images in the first
20: the ImageNet teacher's head), `experiment=imagenet/resnet34_resnet18` with RandomResizedCrop(size) +
flip for training, its teacher with random weights (`random_weights=true`: the cost does not depend on
them), batches of 64, `--epochs` epochs, no test during the fit. Three runs per repetition, interleaved,
each `kd-train` in a fresh process:
  student   the student alone (teachers=none)
  live      KD, the teacher run live on every batch (teacher_cache.mode=none; without recorded views the
            store switches itself off under these transforms)
  recorded  KD on `--views` recorded views per image (data.augment.views=K, teacher_cache.mode=disk) from
            a store filled once before the repetitions (its fill is timed apart: `fill`), the views made
            image by image in the loader (data.augment.replay=per_sample)
  recorded_batched  the same with data.augment.replay=batched: the views of a batch made in one roi_align
            after the transfer (on the CPU here: the main thread's work; the op is for GPUs)
Each figure is the fit's wall time (results.json `fit_seconds`) as median [min–max] over the repetitions;
the ratios are formed within a repetition. `teacher_forward_samples` comes from results.json, and the
store's size per image is the sum of its files over the training images.
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
sys.path.insert(0, str(ROOT))

from kd_lightning.data.generate import write_image_folder  # noqa: E402


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def kd_train(args: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "kd_lightning.train", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"kd-train {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    out = next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir="))
    return json.loads((Path(out) / "results.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="data.num_workers")
    p.add_argument("--replays", default="per_sample,batched", help="data.augment.replay of the recorded runs")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        write_image_folder(tmp / "train", a.images, a.size, classes=1000, used=20)
        write_image_folder(tmp / "val", 100, a.size, classes=1000, used=20, seed=1)
        env = {**os.environ, "KD_CACHE_DIR": str(tmp / "cache"), "PYTHONWARNINGS": "ignore"}
        crop = f"{{_target_: torchvision.transforms.v2.RandomResizedCrop, size: {a.size}}}"
        flip = "{_target_: torchvision.transforms.v2.RandomHorizontalFlip, p: 0.5}"
        evals = (
            f"[{{_target_: torchvision.transforms.v2.Resize, size: {a.size}}}, "
            f"{{_target_: torchvision.transforms.v2.CenterCrop, size: {a.size}}}]"
        )
        common = [
            "experiment=imagenet/resnet34_resnet18", f"data.root={tmp / 'train'}", f"data.test_root={tmp / 'val'}",
            f"data.train_transforms=[{crop}, {flip}]", f"data.eval_transforms={evals}", "data.batch_size=64",
            f"data.num_workers={a.workers}", f"trainer.max_epochs={a.epochs}", "test_each_epoch=false",
            "trainer.enable_progress_bar=false", "logger=none", "print_summary=false", "callbacks=none",
        ]  # fmt: skip
        teacher = ["teachers.members.teacher.random_weights=true"]
        store = [
            f"data.augment.views={a.views}",
            "teacher_cache.mode=disk",
            f"teacher_cache.dir={tmp / 'stores'}",
        ]
        runs = {
            "student": [*common, "teachers=none", "distill=none"],
            "live": [*common, *teacher, "teacher_cache.mode=none"],
        }
        recorded = {"per_sample": "recorded", "batched": "recorded_batched"}
        for replay in a.replays.split(","):
            runs[recorded[replay]] = [*common, *teacher, *store, f"data.augment.replay={replay}"]
        fills = {
            name: kd_train([*runs[name], f"hydra.run.dir={tmp / f'fill_{name}'}"], env)
            for name in runs
            if name.startswith("recorded")
        }
        fill = next(iter(fills.values()))
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        forwards: dict[str, set[int]] = {name: set() for name in runs}
        for rep in range(a.reps):
            for name, args in runs.items():
                r = kd_train([*args, f"hydra.run.dir={tmp / f'{name}{rep}'}"], env)
                seconds[name].append(r["fit_seconds"])
                forwards[name].add(r.get("teacher_forward_samples") or 0)
        n = fill["train_samples"]
        store_bytes = sum(Path(f).stat().st_size for f in fill["teacher_store_files"])
    print(
        f"views: {a.images} images of {a.size}x{a.size}, resnet34 -> resnet18 (standard stem), "
        f"K={a.views}, {a.epochs} epochs, batch 64, {a.reps} reps"
    )
    for name in runs:
        print(f"views.{name}_fit_s={spread(seconds[name])}  teacher_forward_samples={sorted(forwards[name])}")
    for name, filled in fills.items():
        print(
            f"views.fill_s={filled['fit_seconds']:.2f} (its precompute {filled['teacher_precompute_seconds']:.2f}, "
            f"{name})  teacher_forward_samples={filled['teacher_forward_samples']}"
        )
    ratio = {
        k: [x / s for x, s in zip(seconds[k], seconds["student"], strict=True)]
        for k in runs
        if k != "student"
    }
    print(f"views.live_over_student={spread(ratio['live'], 3)}")
    for name in fills:
        print(f"views.{name}_over_student={spread(ratio[name], 3)}  (goal <= 1.10)")
    print(
        f"views.store_bytes_per_image={store_bytes / n:.0f}  per view={store_bytes / n / a.views:.0f} "
        f"({len(fill['teacher_store_files'])} files, {store_bytes / 2**20:.1f} MiB for {n} images)"
    )


if __name__ == "__main__":
    main()
