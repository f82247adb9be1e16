"""Where the teachers' stored outputs for a training sample live: the stores' rows, called slots.

The data speaks of samples and their recorded views only (`Batch.index`, `Batch.view`: with
`data.augment.views=K` every training sample has K views, and each batch says which one each sample shows).
The stores hold one row per (sample, view), at slot sample·K + view, so the K views of a sample are
adjacent; without recorded views a sample's slot is its index. This module is the one place that says so:
the stores' key counts `Slots.count` rows, the steps and the loader's workers turn a batch's samples and views
into slots with `rows`, and the precompute turns missing slots back into the samples and views to show the
teachers with `keys`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class ViewedData(Protocol):
    """What the layout reads of a datamodule (kd_lightning.data.base.TensorDataModule)."""

    @property
    def num_train(self) -> int: ...

    @property
    def views_per_sample(self) -> int: ...


@dataclass(frozen=True)
class Slots:
    """The rows of a run's teacher stores: `samples` training samples × `views` views of each."""

    samples: int
    views: int = 1

    @classmethod
    def of(cls, dm: ViewedData) -> Slots:
        return cls(dm.num_train, dm.views_per_sample)

    @property
    def count(self) -> int:
        """Rows every store of the run holds."""
        return self.samples * self.views

    def rows(self, index: torch.Tensor, view: torch.Tensor | None) -> torch.Tensor:
        """The slots of these samples in these views, computed where the tensors are (no host read)."""
        if view is None:
            if self.views > 1:
                raise ValueError(
                    f"the teacher stores hold {self.views} recorded views per sample, but the batch says "
                    "which view none of its samples shows (Batch.view is None)"
                )
            return index
        return index * self.views + view

    def keys(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The samples and views of these slots (views None without recorded views): what the teachers must
        be shown to fill them."""
        if self.views == 1:
            return rows, None
        return rows.div(self.views, rounding_mode="floor"), rows.remainder(self.views)
