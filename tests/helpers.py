"""Callbacks that tests inject through the config (`+callbacks.x._target_=tests.helpers.X`)."""

import pytorch_lightning as pl
import torch


class PoisonWeightsAtEpoch(pl.Callback):
    """Make the student's weights NaN at the start of `epoch`, as a diverging run would."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for p in pl_module.student.parameters():
                    p.fill_(float("nan"))
