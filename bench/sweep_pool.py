"""Sweeps that fill a GPU: K jobs of the CIFAR pair at once on one GPU (hydra/launcher=gpu_pool), and K packed
(hydra/launcher=packed), against one.

    python bench/sweep_pool.py [--k 1,4,8] [--kinds student,live] [--launchers pool,packed] [--out FILE]  # GPU
    python bench/sweep_pool.py --cpu                                              # smoke mode, tiny

For each kind (`student`: the student alone, distill=none; `live`: KD with the teacher live) and each K, one
sweep of K jobs (seeds 0..K-1) of experiment=cifar100/resnet32x4_resnet8x4 on generated CIFAR-format images
(teachers with random weights), bf16-mixed, through hydra/launcher=gpu_pool jobs_per_gpu=K, so the K jobs
run at once on the one GPU; and (`packed`) K jobs of one seed that differ in distill.ce_weight, trained as
one pack (hydra/launcher=packed: the K students fused, the teacher run once per batch). Printed per sweep:
  images_per_s  every job's training samples over the sweep's wall time (start-up, compilation, validation
                and test included: what a user waits for); a sum of each job's own steady speed would count
                jobs that ran one after another as if side by side
  wall_s        the sweep's wall time
  over_one      images_per_s over K = 1's (the gain of packing jobs onto the GPU)
The smoke mode runs K = 1, 2 tiny on the CPU, where the pool runs one job at a time: it checks the script,
not the speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

from multirun import run_quietly  # noqa: E402

from kd_lightning.data.generate import write_cifar  # noqa: E402

SIZES = {"gpu": {"n": 12800, "epochs": 3, "batch": 128}, "cpu": {"n": 128, "epochs": 2, "batch": 32}}


def sweep(kind: str, k: int, mode: str, data: Path, out: Path, launcher: str = "pool") -> dict[str, float]:
    z = SIZES[mode]
    jobs = (
        [f"seed={','.join(map(str, range(k)))}", "hydra/launcher=gpu_pool", f"jobs_per_gpu={k}"]
        if launcher == "pool"
        else [
            "seed=0",
            f"distill.ce_weight={','.join(str(1 - i / 100) for i in range(k))}",
            "hydra/launcher=packed",
        ]
    )
    args = [
        "-m", "experiment=cifar100/resnet32x4_resnet8x4", f"data.root={data}", *jobs, f"trainer={'gpu' if mode == 'gpu' else 'cpu'}",
        f"trainer.precision={'bf16-mixed' if mode == 'gpu' else '32-true'}", f"trainer.max_epochs={z['epochs']}",
        f"data.batch_size={z['batch']}", "data.num_workers=0", "trainer.enable_progress_bar=false", "logger=none",
        "callbacks=none", "print_summary=false", "test_each_epoch=false", f"hydra.sweep.dir={out}",
        "teachers.members.teacher.random_weights=true",
        "distill=none" if kind == "student" else "teacher_cache.mode=none",
    ]  # fmt: skip
    t0 = time.perf_counter()
    code = run_quietly([sys.executable, "-m", "kd_lightning.train", *args], "bench-sweeps")
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"sweep {kind} K={k} failed (its stderr above)")
    samples = 0
    results = sorted(out.rglob("results.json"))
    for path in results:
        r = json.loads(path.read_text())
        if r.get("status") != "ok":
            raise SystemExit(f"sweep {kind} K={k}: {path} says {r.get('status')}: {r.get('error')}")
        samples += r["train_samples"] * z["epochs"]
    if len(results) != k:
        raise SystemExit(f"sweep {kind} K={k}: {len(results)} results.json, expected {k}")
    return {"images_per_s": samples / wall, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", default="1,4,8")
    p.add_argument("--kinds", default="student,live")
    p.add_argument("--launchers", default="pool,packed")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--out", type=Path, help="also write the lines to this file")
    a = p.parse_args()
    mode = "cpu" if a.cpu else "gpu"
    ks = [1, 2] if a.cpu else [int(k) for k in a.k.split(",")]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "cifar"
        write_cifar(data, 100, n_train=SIZES[mode]["n"], n_test=64)
        for kind in a.kinds.split(","):
            one = None
            for launcher in a.launchers.split(","):
                for k in ks:
                    if k == 1 and launcher != "pool":
                        continue  # one job: the same run either way
                    m = sweep(kind, k, mode, data, Path(tmp) / f"{kind}-{launcher}-{k}", launcher)
                    one = m["images_per_s"] if k == 1 else one
                    gain = f"  over_one={m['images_per_s'] / one:.2f}" if one else ""
                    line = (
                        f"sweep_{launcher}.{kind}.K={k}: images_per_s={m['images_per_s']:.0f}  "
                        f"wall_s={m['wall_s']:.1f}{gain}"
                    )
                    print(line, flush=True)
                    lines.append(line)
    if a.out is not None:
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
