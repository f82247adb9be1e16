"""The papers' protocol and reporting: the whole training set (data.val_fraction=0), the last epoch's and the
best epoch's test accuracy beside the validation-chosen one."""

import pytest
import pytorch_lightning as pl
import torch

from kd_lightning.data import DigitsDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.runners.run import run


class ZeroHeadAtFitEnd(pl.Callback):
    """After the fit, the student predicts class 0 for everything: the last epoch and the checkpoint differ."""

    def on_fit_end(self, trainer, pl_module):
        head = [m for m in pl_module.student.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()


def test_whole_training_set_with_a_test_curve(make_cfg):
    r = run(make_cfg("data.val_fraction=0", "test_each_epoch=true", "distill=kd"))
    whole = DigitsDataModule()
    whole.setup()
    assert r["status"] == "ok" and r["val_acc"] is None
    assert r["train_samples"] == len(whole.splits["train"]) + len(whole.splits["val"])
    curve = r["test_curve"]
    assert (
        len(curve) == 2
        and r["best_test_acc"] == max(curve)
        and r["best_test_epoch"] == curve.index(max(curve))
    )
    assert "test set" in r["best_test_acc_selection"]
    # no validation split: the checkpoint is the last epoch, tested once more after the fit
    assert r["last_test_acc"] == pytest.approx(curve[-1], abs=1e-6)
    assert r["test_acc"] == pytest.approx(r["last_test_acc"], abs=1e-6)
    assert r["best_checkpoint"].endswith("epoch001.ckpt")
    assert torch.load(r["best_checkpoint"], weights_only=True)["test_curve"] == pytest.approx(curve)


def test_last_epoch_and_validation_chosen_checkpoint_are_tested_apart(make_cfg):
    r = run(make_cfg("distill=kd", "+callbacks.zero._target_=tests.test_protocol.ZeroHeadAtFitEnd"))
    y = DigitsDataModule()
    y.setup()
    share_of_class_0 = float((y.labels("test") == 0).float().mean())
    assert r["last_test_acc"] == pytest.approx(share_of_class_0, abs=1e-6)
    assert r["test_acc"] > 0.5 and "best_test_acc" not in r


def test_a_callback_watching_validation_without_a_validation_split_is_refused(make_cfg):
    cfg = make_cfg(
        "data.val_fraction=0",
        "+callbacks.stop._target_=pytorch_lightning.callbacks.EarlyStopping",
        "+callbacks.stop.monitor=val/acc",
    )
    with pytest.raises(ConfigError, match=r"callbacks.stop monitors val/acc, but data.val_fraction=0"):
        run(cfg)
