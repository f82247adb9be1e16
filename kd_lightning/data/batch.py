"""The batch contract: every datamodule yields `Batch(x, y, index, slot, targets)`, read by name, never by position.

- `x`: inputs as loaded (uint8 or float) until `prepare_batch` scales, normalises and augments them;
- `y`: class labels;
- `index`: each sample's position in its split (the teacher-output cache and CRD's memory key on it);
- `slot`: under consistent teaching (`data.augment.views=K`) the recorded (sample, view) the teachers'
  outputs belong to; None otherwise;
- `targets`: the teachers' stored outputs for these slots as stored, `{member: {tap: (rows, ...)}}`, when the
  loader reads them beside the inputs (stores kept on the host: too large for the device's memory); None
  otherwise.
A NamedTuple, so Lightning moves it to the device and default collation keeps its type.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    targets: dict[str, dict[str, tuple[torch.Tensor, ...]]] | None = None

    @property
    def cache_slot(self) -> torch.Tensor | None:
        """Where the teachers' outputs for these inputs are stored: the view slot, else the sample index."""
        return self.slot if self.slot is not None else self.index


def collate_samples(samples: list[tuple]) -> Batch:
    """Samples `(x, y, index)` read one at a time (image files), or `(x, y, index, slot)` when the dataset
    makes recorded views, → one Batch."""
    columns = list(zip(*samples, strict=True))
    xs, ys, idx = columns[:3]
    slot = torch.as_tensor(columns[3], dtype=torch.long) if len(columns) > 3 else None
    return Batch(
        torch.stack(xs), torch.as_tensor(ys, dtype=torch.long), torch.as_tensor(idx, dtype=torch.long), slot
    )
