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
  (c) KD, stores filled    kd_lightning, teacher_cache.mode=memory (the precompute stage runs before the
                           first step and is not timed: it is the teachers' one pass over the data)
  (d) hand-written loops   the same computations as (a), (b) and (c) in plain PyTorch, batches gathered from
                           the tensors in memory (hand_student, hand, hand_cached: the teachers' mean logits
                           of every sample computed before the loop and gathered by index)
  (e) bare Lightning       the student alone as a minimal LightningModule (cross-entropy, Adam) under the same
                           Trainer settings, batches from the same tensors: what Lightning itself costs
  (f) torchdistill         DistillationBox with KDLoss, the teachers' ensemble as its teacher
  and, timed apart, the teachers' forward pass alone (for live_over_sum).
Each of (a)-(e) is one run of `--steps` timed steps; a repetition runs them all in turn, and `--reps`
repetitions are interleaved, so a slow spell of this shared machine hits every configuration alike.
Every figure is printed as `name=median [min–max]` over the repetitions (ratios are formed within a
repetition). Ratios are times, lower is better; `framework_over_hand` compares live teachers step for step
with the hand-written loop, `student_over_hand` and `cached_over_hand` the two other modes with theirs;
`hand_cached_over_hand_student` is what stored targets cost over the student alone in plain PyTorch (the
KD loss's own operations: the floor of `cached_over_student`); `lightning_over_hand` is a bare
LightningModule's student step over the hand-written one (Lightning's own cost per step: the floor of
`student_over_hand`), `student_over_lightning` kd_lightning's student step over the bare LightningModule's; `ours_over_torchdistill` compares live
teachers step for step, `ours_cached_over_torchdistill` kd_lightning's default (stores filled before the fit).
Usage: python bench/throughput.py [--workloads cifar,mnist1d] [--steps 30] [--reps 5] [--batch 32]
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

from kd_lightning.config.optim import build_optim  # noqa: E402
from kd_lightning.core.module import DistillationModule  # noqa: E402
from kd_lightning.core.objective import Objective, build_objective  # noqa: E402
from kd_lightning.data.base import TensorDataModule  # noqa: E402
from kd_lightning.models import create_model  # noqa: E402
from kd_lightning.models.taps import FeatureTaps  # noqa: E402
from kd_lightning.teachers.ensemble import TeacherEnsemble  # noqa: E402
from kd_lightning.teachers.feed import TeacherFeed  # noqa: E402
from kd_lightning.teachers.outputs import TeacherOutputs  # noqa: E402
from kd_lightning.teachers.precompute import TeacherPrecompute  # noqa: E402
from kd_lightning.teachers.slots import Slots  # noqa: E402
from kd_lightning.teachers.store import TapStore, store_key  # noqa: E402

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
    outputs = None
    if cache:
        n = dm.num_train
        key = lambda m: store_key({"bench": m}, n, m, "logits", "logits", "float32", "32-true")  # noqa: E731
        outputs = TeacherOutputs(
            {
                m: {"logits": TapStore(key(m), (work["classes"],), None, f"{m}-logits")}
                for m in teachers.names
            },
            Slots(n),
        )
    optim = build_optim({"_target_": "torch.optim.Adam", "_partial_": True, "lr": LR}, None)
    feed = TeacherFeed(teachers, outputs) if teachers is not None else None
    module = DistillationModule(student, objective, feed, taps, work["classes"], optim)
    return module, teachers


def time_ours(work, dm, with_teachers: bool, cache: bool, warmup: int) -> float:
    module, _ = build(work, dm, with_teachers, cache)
    timer = StepTimer(warmup)
    precompute = [TeacherPrecompute(module.feed)] if module.feed is not None else []  # as a run adds it
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer, *precompute],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return statistics.median(timer.times)


def batches(dm: TensorDataModule):
    ds = dm.splits["train"]
    n, b = len(ds), dm.batch_size
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    for i in range(0, n - b + 1, b):
        idx = perm[i : i + b]
        yield ds.x[idx], ds.y[idx], idx


def kd_loss(s_logits, t_logits, y):
    kl = F.kl_div(
        F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits / T, 1), reduction="batchmean", log_target=True
    )
    return (1 - ALPHA) * F.cross_entropy(s_logits, y) + ALPHA * T * T * kl


def time_hand(work, dm, kind: str, warmup: int) -> float:
    """A plain PyTorch loop: `student` (cross-entropy alone), `live` (the teachers run on every batch) or
    `cached` (the teachers' mean logits of every sample computed first, gathered by index)."""
    torch.manual_seed(0)
    teacher = Ensemble([create_model(s, work["classes"], work["shape"]) for s in work["teachers"]]).eval()
    teacher.requires_grad_(False)
    student = create_model(work["student"], work["classes"], work["shape"]).train()
    opt = torch.optim.Adam(student.parameters(), lr=LR)
    stored = None
    if kind == "cached":
        with torch.no_grad():
            stored = torch.cat([teacher(x) for x in dm.splits["train"].x.split(512)])
    times, t0 = [], None
    for step, (x, y, idx) in enumerate(batches(dm)):
        now = time.perf_counter()
        if t0 is not None and step > warmup:
            times.append(now - t0)
        t0 = now
        if kind == "student":
            loss = F.cross_entropy(student(x), y)
        else:
            if stored is not None:
                t_logits = stored[idx]
            else:
                with torch.no_grad():
                    t_logits = teacher(x)
            loss = kd_loss(student(x), t_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return statistics.median(times)


class BareStudent(pl.LightningModule):
    """The student alone, as little as Lightning needs: what its own loop costs per step."""

    def __init__(self, work: dict):
        super().__init__()
        torch.manual_seed(0)
        self.student = create_model(work["student"], work["classes"], work["shape"])

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self.student(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.student.parameters(), lr=LR)


class Batches:
    """The hand loop's batches, as an iterable with a length (what Lightning needs of a loader)."""

    def __init__(self, dm: TensorDataModule):
        self.dm = dm

    def __iter__(self):
        return batches(self.dm)

    def __len__(self) -> int:
        return len(self.dm.splits["train"]) // self.dm.batch_size


def time_lightning(work, dm, warmup: int) -> float:
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(BareStudent(work), train_dataloaders=Batches(dm))
    return statistics.median(timer.times)


def time_teacher_forward(work, dm, warmup: int) -> float:
    _, teachers = build(work, dm, True, False)
    times = []
    for step, (x, _, _) in enumerate(batches(dm)):
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


def spread(values: list[float]) -> str:
    """`median [min–max]` of one figure over the repetitions."""
    return f"{statistics.median(values):.3f} [{min(values):.3f}–{max(values):.3f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="cifar,mnist1d")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run (at least 30)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (at least 5)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {a.reps} repetitions of {a.steps} steps"
    )
    for name in a.workloads.split(","):
        work = WORKLOADS[name]
        b = a.batch if name == "cifar" else 4 * a.batch
        n = (a.steps + a.warmup + 2) * b  # one epoch = the timed steps, after the warm-up
        dm = RandomData(n, work["shape"], work["classes"], b)
        dm.setup("fit")
        runs: dict[str, list[float]] = {}
        for rep in range(a.reps):
            print(f"  [{name}] repetition {rep + 1}/{a.reps}", file=sys.stderr, flush=True)
            for key, fn, args in (
                ("student", time_ours, (False, False)),
                ("live", time_ours, (True, False)),
                ("cached", time_ours, (True, True)),
                ("hand_student", time_hand, ("student",)),
                ("hand", time_hand, ("live",)),
                ("hand_cached", time_hand, ("cached",)),
                ("lightning", time_lightning, ()),
                ("teacher_forward", time_teacher_forward, ()),
                ("torchdistill", time_torchdistill, ()),
            ):
                t = fn(work, dm, *args, a.warmup)
                if t is not None:
                    runs.setdefault(key, []).append(t)
        print(f"\n[{name}] {dm.num_train} samples, batch {b}; samples/s per step, median [min–max]:")
        for k, ts in runs.items():
            print(f"  {k:16s} {spread([b / t for t in ts]):>28s} samples/s")
        ratios = {
            "cached_over_student": ("cached", "student"),
            "live_over_sum": ("live", None),
            "framework_over_hand": ("live", "hand"),
            "student_over_hand": ("student", "hand_student"),
            "cached_over_hand": ("cached", "hand_cached"),
            "hand_cached_over_hand_student": ("hand_cached", "hand_student"),
            "lightning_over_hand": ("lightning", "hand_student"),
            "student_over_lightning": ("student", "lightning"),
            "ours_over_torchdistill": ("live", "torchdistill"),
            "ours_cached_over_torchdistill": ("cached", "torchdistill"),
        }
        for label, (num, den) in ratios.items():
            if den is not None and den not in runs:
                continue
            if den is None:
                vals = [
                    lv / (s + f)
                    for lv, s, f in zip(runs["live"], runs["student"], runs["teacher_forward"], strict=True)
                ]
            else:
                vals = [x / y for x, y in zip(runs[num], runs[den], strict=True)]
            print(f"{name}.{label}={spread(vals)}")


if __name__ == "__main__":
    main()
