"""The batch contract: every datamodule yields `Batch(x, y, index, view, targets)`, read by name, never by position.

- `x`: inputs as loaded (uint8 or float) until `prepare_batch` scales, normalises and augments them;
- `y`: class labels;
- `index`: each sample's position in its split (the teacher-output cache and CRD's memory key on it);
- `view`: under consistent teaching (`data.augment.views=K`) which of its K recorded views each sample shows
  (0..K-1); None otherwise. Where the teachers' outputs for a (sample, view) are stored is the stores' own
  business (kd_lightning.teachers.slots);
- `targets`: the teachers' stored outputs for these samples (in these views) as stored, `{member: {tap: (rows, ...)}}`, when the
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
    view: torch.Tensor | None = None
    targets: Targets | None = None


def collate_samples(samples: object) -> Batch:
    """Samples `(x, y, index)` read one at a time (image files), or `(x, y, index, view)` when the dataset
    makes recorded views, → one Batch."""
    if not isinstance(samples, list):
        raise TypeError(f"collate_samples takes a list of samples, got {type(samples).__name__}")
    columns = list(zip(*samples, strict=True))
    xs, ys, idx = columns[:3]
    view = torch.as_tensor(columns[3], dtype=torch.long) if len(columns) > 3 else None
    return Batch(
        torch.stack(xs), torch.as_tensor(ys, dtype=torch.long), torch.as_tensor(idx, dtype=torch.long), view
    )
