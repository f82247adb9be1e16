"""The progress bar: Lightning's RichProgressBar, showing the training loss as it was last read.

Lightning shows a value logged with `prog_bar=True` by reading it on the host after every step, which makes
every step wait for the GPU. The training loss is read every `trainer.log_every_n_steps` steps instead
(kd_lightning.core.tally), and this bar shows that value.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


class LossProgressBar(RichProgressBar):
    def get_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "shown_loss", math.nan)
        if not math.isnan(loss):
            items["loss"] = f"{loss:.4g}"
        return items
