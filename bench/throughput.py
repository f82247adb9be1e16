"""make bench: training throughput (samples/s) of kd_lightning against a student alone, a hand-written
PyTorch loop and torchdistill, on the same KD job, in one process.

Workloads
  cifar   : 2 × resnet32x4 teachers (mean logits) → resnet8x4 student, 32×32×3 inputs, 100 classes
  mnist1d : 3 × cnn1d teachers (mean logits) → MLP student, MNIST-1D signals, 10 classes
The job is Hinton KD on the teachers' mean logits plus cross-entropy, Adam, batches from memory.
Weights are random: throughput does not depend on them.

Measured per workload (steady state, the first `--warmup` steps of each run skipped; the time of a step
is the time from one step's start to the next one's, data fetch, logging and optimiser included):
  (a) student alone        kd_lightning, teachers=none
  (b) KD, live teachers    kd_lightning, teacher_cache.mode=none
  (c) KD, cache warm       kd_lightning, teacher_cache.mode=memory, second epoch
  (d) hand-written loop    the same computation as (b) in plain PyTorch
  (e) torchdistill         DistillationBox with KDLoss, the teachers' ensemble as its teacher
  and, timed apart, the teachers' forward pass alone (for live_over_sum).
Prints each figure and the ratios (times, lower is better) as name=value lines; `ours_over_torchdistill`
compares live teachers step for step, `ours_cached_over_torchdistill` kd_lightning's default
(teacher_cache.mode=memory) from the second epoch on.
Usage: python bench/throughput.py [--workloads cifar,mnist1d] [--samples 256] [--batch 32] [--warmup 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd_lightning.data.base import TensorDataModule  # noqa: E402
from kd_lightning.models import create_model  # noqa: E402
from kd_lightning.module import DistillationModule  # noqa: E402
from kd_lightning.objective import Objective, build_objective  # noqa: E402
from kd_lightning.taps import FeatureTaps  # noqa: E402
from kd_lightning.teacher_cache import TeacherOutputCache  # noqa: E402
from kd_lightning.teachers import TeacherEnsemble  # noqa: E402

T, ALPHA, LR = 4.0, 0.9, 1e-3
WORKLOADS = {
    "cifar": {
        "shape": (3, 32, 32),
        "classes": 100,
        "teachers": [{"name": "resnet32x4"}, {"name": "resnet32x4"}],
        "student": {"name": "resnet8x4"},
    },
    "mnist1d": {
        "shape": (1, 40),
        "classes": 10,
        "teachers": [{"name": "cnn1d", "channels": [64, 64, 64]}] * 3,
        "student": {"name": "mlp", "hidden": [100, 100]},
    },
}


class RandomData(TensorDataModule):
    """`n` random inputs of one shape, all in the training split (val/test are small)."""

    name = "bench"

    def __init__(self, n: int, shape: tuple[int, ...], classes: int, batch_size: int):
        super().__init__(batch_size=batch_size, val_fraction=0.01, normalize=False)
        self.n, self.shape, self.classes = n, shape, classes

    def load(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        m = int(self.n * 1.02) + 1
        x = rng.standard_normal((m + 64, *self.shape)).astype(np.float32)
        y = rng.integers(0, self.classes, m + 64)
        y[: self.classes] = np.arange(self.classes)  # every class present
        return {"x_train": x[:m], "y_train": y[:m], "x_test": x[m:], "y_test": y[m:]}


class StepTimer(pl.Callback):
    """Wall time between consecutive train-batch starts (so everything of a step is counted)."""

    def __init__(self, skip: int, from_epoch: int = 0):
        self.skip, self.from_epoch, self.times, self._t = skip, from_epoch, [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        now = time.perf_counter()
        if self._t is not None and trainer.current_epoch >= self.from_epoch and batch_idx > self.skip:
            self.times.append(now - self._t)
        self._t = now

    def on_train_epoch_end(self, trainer, module):
        self._t = None


class Ensemble(nn.Module):
    """The teachers as one module with mean logits (torchdistill takes one teacher)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([m(x) for m in self.members]).mean(0)


def build(work: dict, dm: TensorDataModule, with_teachers: bool, cache: bool):
    torch.manual_seed(0)
    teachers = None
    if with_teachers:
        members = {
            f"t{i}": create_model(spec, work["classes"], work["shape"])
            for i, spec in enumerate(work["teachers"])
        }
        teachers = TeacherEnsemble(members)
        teachers.configure_taps(["logits"])
    student = create_model(work["student"], work["classes"], work["shape"])
    distill = (
        {"ce_weight": 1 - ALPHA, "terms": {"kd": {"weight": ALPHA, "student_tap": "logits", "teacher_tap": "logits",
                                                  "distance": "kl", "temperature": T, "adapter": "none", "combine": "mean"}}}
        if with_teachers
        else {"ce_weight": 1.0, "terms": {}}
    )  # fmt: skip
    taps = FeatureTaps(student, Objective.student_taps(distill))
    shapes = {"logits": (work["classes"],)}
    t_shapes = {m: {"logits": (work["classes"],)} for m in teachers.names} if teachers else None
    objective = build_objective(distill, shapes, t_shapes, teachers.weights if teachers else None)
    module = DistillationModule(
        student, objective, teachers, taps, work["classes"], {"name": "adam", "lr": LR}
    )
    if cache:
        object.__setattr__(module, "teacher_cache", TeacherOutputCache(len(dm.splits["train"]), "bench"))
    return module, teachers


def time_ours(work, dm, with_teachers: bool, cache: bool, epochs: int, warmup: int) -> float:
    module, _ = build(work, dm, with_teachers, cache)
    timer = StepTimer(warmup, from_epoch=epochs - 1)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return statistics.median(timer.times)


def batches(dm: TensorDataModule):
    ds = dm.splits["train"]
    n, b = len(ds), dm.batch_size
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    for i in range(0, n - b + 1, b):
        x, y, *_ = ds.__getitems__(perm[i : i + b].tolist())
        yield x, y


def kd_loss(s_logits, t_logits, y):
    kl = F.kl_div(
        F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits / T, 1), reduction="batchmean", log_target=True
    )
    return (1 - ALPHA) * F.cross_entropy(s_logits, y) + ALPHA * T * T * kl


def time_hand(work, dm, warmup: int) -> float:
    torch.manual_seed(0)
    teacher = Ensemble([create_model(s, work["classes"], work["shape"]) for s in work["teachers"]]).eval()
    teacher.requires_grad_(False)
    student = create_model(work["student"], work["classes"], work["shape"]).train()
    opt = torch.optim.Adam(student.parameters(), lr=LR)
    times, t0 = [], None
    for step, (x, y) in enumerate(batches(dm)):
        now = time.perf_counter()
        if t0 is not None and step > warmup:
            times.append(now - t0)
        t0 = now
        with torch.inference_mode():
            t_logits = teacher(x)
        loss = kd_loss(student(x), t_logits.clone(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return statistics.median(times)


def time_teacher_forward(work, dm, warmup: int) -> float:
    _, teachers = build(work, dm, True, False)
    times = []
    for step, (x, _) in enumerate(batches(dm)):
        t0 = time.perf_counter()
        teachers(x)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_torchdistill(work, dm, warmup: int) -> float | None:
    try:
        from torch.utils.data import RandomSampler, TensorDataset
        from torchdistill.core.distillation import DistillationBox
    except ImportError:
        print("torchdistill is not installed (pip install -e '.[bench]'); skipping it", file=sys.stderr)
        return None
    logging.getLogger("torchdistill").setLevel(logging.WARNING)
    torch.manual_seed(0)
    teacher = Ensemble([create_model(s, work["classes"], work["shape"]) for s in work["teachers"]])
    student = create_model(work["student"], work["classes"], work["shape"])
    ds = dm.splits["train"]
    dataset = TensorDataset(ds.x, ds.y)
    config = {
        "num_epochs": 1,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
            "kwargs": {"batch_size": dm.batch_size, "num_workers": 0, "drop_last": True},
        },
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "forward_hook": {"input": [], "output": []}, "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "sequential": [], "forward_hook": {"input": [], "output": []}, "requires_grad": True},
        "optimizer": {"key": "Adam", "kwargs": {"lr": LR}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
                "teacher_module_io": "output", "temperature": T, "alpha": 1 - ALPHA, "reduction": "batchmean"}},
                "weight": 1.0}}},
        },
    }  # fmt: skip
    box = DistillationBox(teacher, student, {"train": dataset}, config, torch.device("cpu"), None, False, 1)
    box.pre_epoch_process(epoch=0)
    times, t0 = [], None
    for step, (x, y, supp) in enumerate(box.train_data_loader):
        now = time.perf_counter()
        if t0 is not None and step > warmup:
            times.append(now - t0)
        t0 = now
        loss = box.forward_process(x, y, supp)
        box.post_forward_process(loss=loss)
    box.post_epoch_process()
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="cifar,mnist1d")
    p.add_argument("--samples", type=int, default=256, help="training samples (cifar); mnist1d uses 8x")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    for name in a.workloads.split(","):
        work = WORKLOADS[name]
        n = a.samples if name == "cifar" else 8 * a.samples
        dm = RandomData(n, work["shape"], work["classes"], a.batch if name == "cifar" else 4 * a.batch)
        dm.setup("fit")
        b = dm.batch_size
        t = {
            "student": time_ours(work, dm, False, False, 1, a.warmup),
            "live": time_ours(work, dm, True, False, 1, a.warmup),
            "cached": time_ours(work, dm, True, True, 2, a.warmup),
            "hand": time_hand(work, dm, a.warmup),
            "teacher_forward": time_teacher_forward(work, dm, a.warmup),
            "torchdistill": time_torchdistill(work, dm, a.warmup),
        }
        print(f"\n[{name}] {len(dm.splits['train'])} samples, batch {b}; samples/s (median step):")
        for k, v in t.items():
            if v is not None:
                print(f"  {k:16s} {b / v:10.1f} samples/s   {1000 * v:8.2f} ms/step")
        print(f"{name}.cached_over_student={t['cached'] / t['student']:.3f}")
        print(f"{name}.live_over_sum={t['live'] / (t['student'] + t['teacher_forward']):.3f}")
        print(f"{name}.framework_over_hand={t['live'] / t['hand']:.3f}")
        if t["torchdistill"] is not None:
            print(f"{name}.ours_over_torchdistill={t['live'] / t['torchdistill']:.3f}")
            # kd_lightning's default (teacher_cache.mode=memory) from the second epoch on, same job
            print(f"{name}.ours_cached_over_torchdistill={t['cached'] / t['torchdistill']:.3f}")


if __name__ == "__main__":
    main()
