"""Frozen-teacher invariants on a real fit of the default (digits) configuration."""

from pathlib import Path

import pytorch_lightning as pl
import torch

from kd_lightning.config.run_spec import parse_run
from kd_lightning.data.from_config import instantiate_datamodule
from kd_lightning.engine.build import build_module, build_teacher_ensemble
from kd_lightning.engine.trainers import build_trainer
from kd_lightning.models import load_model
from kd_lightning.runners.run import run

from .conftest import built_data


class ModeProbe(pl.Callback):
    """Record the teachers' mode at every training step (after Lightning's per-epoch .train())."""

    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(any(m.training for m in pl_module.teachers.modules()))


def _build(cfg):
    spec, dm = built_data(cfg)
    teachers = build_teacher_ensemble(spec, dm)
    return dm, build_module(spec, dm, teachers)


def test_teachers_frozen_in_eval_and_out_of_optimizer_and_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg()
    dm, module = _build(cfg)
    before = {k: v.clone() for k, v in module.teachers.state_dict().items()}
    probe = ModeProbe()
    trainer = build_trainer(parse_run(cfg))
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=dm)

    assert probe.modes and not any(probe.modes), "a teacher module was in training mode during a step"
    after = module.teachers.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher weights or BN statistics changed"
    assert all(not p.requires_grad and p.grad is None for p in module.teachers.parameters())

    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in module.teachers.parameters()}
    assert {id(p) for p in module.student.parameters()} <= opt_params
    assert {id(p) for p in module.objective.parameters()} <= opt_params  # adapters train with the student

    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and not any("teacher" in k for k in keys)
    assert any(k.startswith("student.") for k in keys) and any(k.startswith("objective.") for k in keys)


def test_module_to_moves_teachers_with_it(make_cfg):
    _, module = _build(make_cfg())
    module.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in module.teachers.parameters())


def test_run_writes_results_and_a_student_that_loads_alone(make_cfg):
    cfg = make_cfg()
    res = run(cfg)
    out = cfg.paths.output_dir
    import json

    saved = json.loads(Path(f"{out}/results.json").read_text())
    for key in (
        "status",
        "seed",
        "test_acc",
        "val_acc",
        "teacher_test_acc",
        "fit_seconds",
        "data",
        "student",
        "teachers",
        "distill",
    ):
        assert key in saved, key
    assert saved["status"] == "ok" and saved["data"] == "digits" and saved["distill"] == "feature"
    assert set(saved["teacher_test_acc"]) == {"cnn_s", "cnn_l"}
    assert 0.0 <= saved["test_acc"] <= 1.0 and saved["test_acc"] == res["test_acc"]

    student = load_model(saved["student_path"])  # no teachers, no adapters, no config needed
    sd = torch.load(saved["student_path"], weights_only=True)["state_dict"]
    assert not any("teacher" in k or "adapter" in k for k in sd)
    dm = instantiate_datamodule(cfg.data)
    dm.setup("test")
    x, y, *_ = dm.prepare_batch(
        dm.splits["test"].__getitems__(list(range(len(dm.splits["test"])))), train=False
    )
    student.eval()
    acc = (student(x).argmax(1) == y).float().mean().item()
    assert abs(acc - saved["test_acc"]) < 1e-6  # the exported student is the tested (best) one
