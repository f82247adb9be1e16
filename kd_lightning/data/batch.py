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

# the teachers' stored outputs for a batch: teacher → tap → the rows as stored (TeacherOutputs.gather)
Targets = dict[str, dict[str, tuple[torch.Tensor, ...]]]


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    # the samples' positions in their split; the name hides tuple.index, which no code of ours calls
    index: torch.Tensor | None = None  # type: ignore[assignment]
    slot: torch.Tensor | None = None
    targets: Targets | None = None

    @property
    def cache_slot(self) -> torch.Tensor | None:
        """Where the teachers' outputs for these inputs are stored: the view slot, else the sample index."""
        return self.slot if self.slot is not None else self.index


def collate_samples(samples: object) -> Batch:
    """Samples `(x, y, index)` read one at a time (image files), or `(x, y, index, slot)` when the dataset
    makes recorded views, → one Batch."""
    if not isinstance(samples, list):
        raise TypeError(f"collate_samples takes a list of samples, got {type(samples).__name__}")
    columns = list(zip(*samples, strict=True))
    xs, ys, idx = columns[:3]
    slot = torch.as_tensor(columns[3], dtype=torch.long) if len(columns) > 3 else None
    return Batch(
        torch.stack(xs), torch.as_tensor(ys, dtype=torch.long), torch.as_tensor(idx, dtype=torch.long), slot
    )
