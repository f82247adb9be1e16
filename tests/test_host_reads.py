"""A training step reads nothing on the host (on a GPU each read makes the CPU wait for the GPU): counted with
`perf.check_syncs=true` (kd_lightning/engine/sync_check.py) in every mode a run trains in, and a read that
is added (here by a callback) fails the run naming where it was made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from kd_lightning.runners.run import run

from .conftest import FAST, ROOT, run_cli, write_cifar

CHECKED = ["perf.check_syncs=true", "trainer.log_every_n_steps=1000", "trainer.max_epochs=1"]


def _cifar(tmp_path: Path) -> list[str]:
    """The CIFAR-100 protocol on generated images, with small CIFAR ResNets: recorded crop/flip views."""
    write_cifar(tmp_path / "cifar", 100, n_train=192, n_test=16)
    return [
        "experiment=cifar100/resnet32x4_resnet8x4", f"data.root={tmp_path / 'cifar'}", "student=resnet8",
        "teachers.members.teacher.arch.name=resnet8", "teachers.members.teacher.random_weights=true",
        "data.batch_size=32", "data.num_workers=0", "test_each_epoch=false", "data.augment.views=2",
    ]  # fmt: skip


def _checked(res: dict) -> None:
    assert res["status"] == "ok", res.get("error")
    assert res["sync_check"]["steps_checked"] >= 3 and res["sync_check"]["host_reads"] == 0, res["sync_check"]


@pytest.mark.parametrize(
    "case",
    [
        ["distill=none"],  # the student alone
        ["teacher_cache.mode=none"],  # two teachers live, a feature term (the embeddings, MSE)
        ["distill=kd"],  # two teachers' stored logits (teacher_cache.mode=memory)
        ["distill=crd"],  # reads its normalising constant once, at the first step
    ],
    ids=["student", "live-two-teachers", "stored-logits", "crd"],
)
def test_no_training_step_reads_a_value_on_the_host(make_cfg, case):
    _checked(run(make_cfg(*CHECKED, *case)))


@pytest.mark.parametrize("method", ["kd", "fitnet"], ids=["stored-views-kd", "stored-views-fitnet"])
def test_no_host_read_with_recorded_views_and_stored_features(make_cfg, tmp_path, method):
    """Crop/flip views replayed on the device from their recorded parameters, the stored teacher outputs
    (logits, or FitNet's feature maps) gathered by slot."""
    res = run(make_cfg(*CHECKED, *_cifar(tmp_path), f"distill={method}", fast=False))
    _checked(res)
    assert res["teacher_forward_samples"] == 2 * res["train_samples"]  # every view once, in the fill


def test_no_host_read_when_the_device_makes_the_recorded_views_of_image_files(make_cfg, tmp_path):
    """data.augment.replay=batched: the loader's worker decodes the images and works out each view's box; the
    step's crop, resize and flip of the whole batch (one roi_align) and the stored logits read nothing."""
    from .test_imagenet_recipe import _pngs
    from .test_views import CROP_FLIP, EVAL, _hydra

    _pngs(tmp_path / "train", ["a", "b", "c"], 12)
    res = run(make_cfg(
        *CHECKED, "data=imagefolder", f"data.root={tmp_path / 'train'}", "data.image_size=null",
        "data.val_fraction=0", "data.batch_size=4", "data.num_workers=1",
        f"data.train_transforms={_hydra(CROP_FLIP)}", f"data.eval_transforms={_hydra(EVAL)}",
        "data.augment={views: 2, replay: batched}", "student=cnn", "teachers.use=[cnn_s]",
        "teachers.members.cnn_s.fit.max_epochs=1", "distill=kd", "teacher_cache.mode=memory",
    ))  # fmt: skip
    _checked(res)
    assert res["teacher_forward_samples"] == 2 * res["train_samples"]  # every view once, in the fill


@pytest.mark.multiprocess
def test_no_host_read_under_ddp_with_stores_read_by_the_loader(tmp_path, cache_dir):
    """Two CPU processes: the stores are files that both ranks map, read beside the inputs by the loader."""
    run_dir = tmp_path / "ddp"
    proc = run_cli(*FAST, *CHECKED, "trainer=ddp_cpu", "trainer.devices=2", "distill=kd",
                   f"hydra.run.dir={run_dir}", cwd=ROOT, env={"KD_CACHE_DIR": str(cache_dir)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    _checked(res)
    # the RAM stores the ranks shared as files in the run folder are gone after the fit, and not listed
    assert res["teacher_store_files"] == [] and not list((run_dir / ".kd").rglob("*.bin"))


class ReadsTheLossOnTheHost(pl.Callback):
    """What a user's callback might do: print the loss of every step."""

    def on_before_backward(self, trainer, pl_module, loss):
        self.last = float(loss)


def test_a_host_read_in_a_step_fails_the_run_and_names_where(make_cfg):
    cfg = make_cfg(
        *CHECKED, "distill=none", "+callbacks.reads._target_=tests.test_host_reads.ReadsTheLossOnTheHost"
    )
    with pytest.raises(
        RuntimeError, match=r"perf\.check_syncs: \d+ host read\(s\) in \d+ checked training steps"
    ):
        run(cfg)
    res = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert (
        res["status"] == "failed" and "test_host_reads.py" in res["error"] and "float(loss)" in res["error"]
    )


def test_the_loss_is_still_checked_every_few_steps_and_names_the_step(make_cfg):
    """No step reads the loss, but a non-finite one still stops the run at the next read (a logging step),
    naming the step it first appeared in."""
    cfg = make_cfg("trainer.max_epochs=1", "trainer.log_every_n_steps=5", "distill=none",
                   "+callbacks.poison._target_=tests.test_host_reads.PoisonAtStep")  # fmt: skip
    with pytest.raises(
        FloatingPointError, match=r"non-finite training loss \(nan\) at epoch 0, step 3: parts"
    ):
        run(cfg)


class PoisonAtStep(pl.Callback):
    """The student's weights become NaN before step 3 (between two reads: steps 0 and 5 read)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 3:
            with torch.no_grad():
                for p in pl_module.student.parameters():
                    p.fill_(float("nan"))
