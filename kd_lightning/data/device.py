"""Data resident on the device: batches gathered on the GPU from splits kept in its memory.

For data that fits in memory (digits, MNIST-1D, CIFAR, ...) a DataLoader costs more than the step of a small
model: each batch is gathered, collated, pinned and copied from the host. `DeviceBatches` keeps a split on
the device once and yields its batches by indexing it there, in the order the DataLoader's sampler gives
(kd_lightning.data.base.EpochSeededSampler: the same batches, the same order, under DDP the same shard), so
a run gives the same results either way. The order of an epoch reaches the device in one copy.
Hand-written: neither Lightning nor torch.utils.data offers a loader over device tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from kd_lightning.data.batch import Batch

# Our choice: a split, or a teacher store, is put on a GPU when it takes at most this share of the memory
# the device has free at the time (the rest is the models', their activations' and the optimiser's).
DEVICE_SHARE = 0.25


class Order(Protocol):
    """An epoch's sample positions, in order, that a resumed run can start part-way (EpochSeededSampler)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[int]: ...

    def resume_after(self, epoch: int, samples: int) -> None: ...


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether `nbytes` may live on `device` (a CUDA device with DEVICE_SHARE of its free memory to spare)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_SHARE * free


class DeviceBatches:
    """The batches of one split, from its tensors `x`, `y` on their device.

    `sampler`: the sample positions of this process's batches, in order, as a DataLoader's (None: the split
    in order). Lightning iterates it like a DataLoader (it has a length)."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        sampler: Order | None = None,
        position: Callable[[], tuple[int, int]] | None = None,
    ):
        self.x, self.y, self.device = x, y, x.device
        self.position = position  # (epoch, batches done): what a mid-epoch checkpoint records
        self.batch_size, self.order = (
            int(batch_size),
            sampler,
        )  # not `sampler`: Lightning would read it as a DataLoader's
        self._n = len(sampler) if sampler is not None else len(self.y)

    def state_dict(self) -> dict[str, int]:
        """How far into its epoch training got (Lightning saves it with a checkpoint)."""
        if self.position is None:
            return {}
        epoch, batches = self.position()
        return {"epoch": epoch, "samples": batches * self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """A resumed run continues the epoch with the batch it would have trained next."""
        if state and self.order is not None:
            self.order.resume_after(state["epoch"], state["samples"])

    def __len__(self) -> int:
        return (self._n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        b = self.batch_size
        if self.order is None:
            index = torch.arange(len(self.y), device=self.device)
            for i in range(0, len(self.y), b):
                yield Batch(self.x[i : i + b], self.y[i : i + b], index[i : i + b])
            return
        host = torch.as_tensor(list(self.order), dtype=torch.long)
        if self.device.type == "cuda":  # page-locked: the epoch's order is copied without waiting for the GPU
            host = host.pin_memory()
        positions = host.to(self.device, non_blocking=True)
        for i in range(0, len(positions), b):
            idx = positions[i : i + b]
            yield Batch(self.x[idx], self.y[idx], idx)
