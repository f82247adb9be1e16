"""The batch contract: every datamodule yields `Batch(x, y, index, view, targets, crop)`, read by name, never by
position.

- `x`: inputs as loaded (uint8 or float) until `prepare_batch` scales, normalises and augments them;
- `y`: class labels;
- `index`: each sample's position in its split (the teacher-output cache and CRD's memory key on it);
- `view`: under consistent teaching (`data.augment.views=K`) which of its K recorded views each sample shows
  (0..K-1); None otherwise. Where the teachers' outputs for a (sample, view) are stored is the stores' own
  business (kd_lightning.teachers.slots);
- `targets`: the teachers' stored outputs for these samples (in these views) as stored,
  `{member: {tap: (rows, ...)}}`, when the loader reads them beside the inputs (stores kept on the host: too
  large for the device's memory); None otherwise;
- `crop`: with `data.augment.replay=batched`, each image's recorded view as (top, left, height, width, flip),
  (N, 5) int64, for the device to crop, resize and flip in one op (`x` then holds the decoded images, padded
  to the batch's largest); None otherwise.
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
    crop: torch.Tensor | None = None


def collate_samples(samples: object) -> Batch:
    """Samples `(x, y, index)` read one at a time (image files), `(x, y, index, view)` when the dataset
    makes recorded views, or `(x, y, index, view, crop)` when it leaves the view's crop to the device
    (images of any size, padded here) → one Batch."""
    if not isinstance(samples, list):
        raise TypeError(f"collate_samples takes a list of samples, got {type(samples).__name__}")
    columns = list(zip(*samples, strict=True))
    xs, ys, idx = columns[:3]
    view = torch.as_tensor(columns[3], dtype=torch.long) if len(columns) > 3 else None
    crop = torch.as_tensor(columns[4], dtype=torch.long) if len(columns) > 4 else None
    x = stack_padded(list(xs)) if crop is not None else torch.stack(xs)
    return Batch(
        x, torch.as_tensor(ys, dtype=torch.long), torch.as_tensor(idx, dtype=torch.long), view, crop=crop
    )


def stack_padded(images: list[torch.Tensor]) -> torch.Tensor:
    """Images (C, H, W) of different sizes as one (N, C, H_max + 1, W_max + 1) tensor, each padded at the bottom
    and right by repeating its last row and column. A crop inside an image then gives the same floats whatever
    its neighbours' sizes: a bilinear sample past an image's last pixel centre always blends that pixel with
    its copy (every image has at least one padded row and column), never meets the tensor's edge, where
    roi_align would take the pixel alone and round otherwise."""
    h = max(img.shape[1] for img in images) + 1
    w = max(img.shape[2] for img in images) + 1
    out = torch.empty((len(images), images[0].shape[0], h, w), dtype=images[0].dtype)
    for k, img in enumerate(images):
        _, ih, iw = img.shape
        out[k, :, :ih, :iw] = img
        out[k, :, :ih, iw:] = img[:, :, iw - 1 :]
        out[k, :, ih:, :] = out[k, :, ih - 1 : ih, :]
    return out
