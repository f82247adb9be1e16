"""The precompute stage and the teacher accounting, as a Lightning callback (the module holds the steps).

`setup` (stage fit), on every rank, before Lightning makes the loaders: under DDP, the ranks compare their
teachers' weight fingerprints (a rank that read another file stops the run); then the stores are filled,
each rank its 1/W share of the missing rows, under the training steps' autocast
(kd_lightning.teachers.outputs.TeacherOutputs.fill), and the rows go where the steps will read them (a copy
on the GPU, or read by the loader's workers beside the inputs). `on_fit_end`: the
samples × teachers each rank ran to make training targets (`forward_by_rank`, results.json's
`teacher_forward_samples`), and the RAM stores that DDP put in the run folder are removed.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch

from kd_lightning.teachers.feed import TeacherFeed
from kd_lightning.teachers.outputs import Ranks


class TeacherPrecompute(pl.Callback):
    def __init__(self, feed: TeacherFeed):
        self.feed = feed
        self.forward_by_rank: list[int] = []  # set at the end of the fit
        self.fill_seconds = 0.0  # this rank's time filling the stores (0 when they were complete)
        self.in_step = False  # the steps gather the stores' rows on their device (else the loader reads them)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before Lightning makes the loaders (it starts their workers while it sets up the optimisers):
        the stores are complete, and the loaders know whether they read the rows beside the inputs."""
        if stage != "fit":
            return
        device = trainer.strategy.root_device
        self.check_teachers_agree(trainer, device)
        outputs = self.feed.outputs
        if outputs is None:
            return
        ranks = Ranks(trainer.global_rank, trainer.world_size, trainer.strategy.barrier)
        if ranks.world > 1:
            outputs.share_between_ranks()
            ranks.barrier()  # every rank has opened the shared files before rank 0 locks them to fill
        dm = getattr(trainer, "datamodule", None)  # Lightning sets it on the Trainer at fit
        if dm is None or self.feed.teachers is None:
            raise RuntimeError("the teacher outputs are filled in a fit with a datamodule and teachers")
        teachers = self.feed.teachers.to(device)  # the module moves them with itself later; the fill is now

        def run_teacher(x: torch.Tensor, member: str) -> dict[str, torch.Tensor]:
            return teachers(x, names=[member])[member]

        t0 = time.perf_counter()
        with trainer.precision_plugin.forward_context():  # the same autocast as the training steps
            outputs.fill(
                run_teacher, lambda chunks: dm.view_batches(chunks, device), ranks, dm.eval_batch_size
            )
        self.fill_seconds = time.perf_counter() - t0
        # the steps gather the rows on their device, or the loader reads them beside the inputs
        self.in_step = outputs.read_in_step(device, ranks.world)
        if self.in_step:
            outputs.keep_on(device)
        dm.read_targets(None if self.in_step else outputs.gather)

    def check_teachers_agree(self, trainer: pl.Trainer, device: torch.device) -> None:
        """Under DDP every rank must hold the same frozen teachers: compare their fingerprints once."""
        teachers = self.feed.teachers
        if trainer.world_size == 1:
            return
        mine = teachers.fingerprint().to(device)
        every = trainer.strategy.all_gather(mine)  # (world_size, n_teachers, 2)
        if not torch.allclose(every, mine.expand_as(every), rtol=1e-9, atol=0.0):
            raise RuntimeError(
                f"the teachers differ between ranks (fingerprints {every.tolist()}); every rank must load the "
                f"same teacher files ({teachers.checkpoints}): put paths.cache_dir on a shared filesystem "
                "or give each teacher an explicit checkpoint"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = torch.tensor([self.feed.computed_samples], device=pl_module.device)
        if trainer.world_size > 1:
            gathered = pl_module.all_gather(counts)
            assert isinstance(gathered, torch.Tensor)
            counts = gathered.flatten()
            trainer.strategy.barrier()
            if trainer.is_global_zero and self.feed.outputs is not None:
                self.feed.outputs.remove_scratch()
        self.forward_by_rank = [int(c) for c in counts.cpu()]
