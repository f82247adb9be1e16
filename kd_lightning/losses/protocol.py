"""What a loss (a method term) may declare to the framework beyond `forward(student, teacher)`.

- `shape_free = True`: student and teacher features may differ in size (no adapter unless asked for);
- `forward` may take `y`, `index`, `epoch`; `__init__` may take `student_shape`, `teacher_shape`,
  `num_samples`, `num_classes` (kd_lightning.losses.registry fills them in);
- `pre_stage() -> PreStage`: a part trained before distillation (RepDistiller's init stage): its loss on
  (adapted student feature, teacher target), what it trains (`module`, the loss's own part, frozen outside
  the stage; `student=True`, the student's layers but its classifier), and `only=True` when the term acts in
  that stage alone (its weight then scales the pre-stage loss and the fit skips it). The driver that trains
  pre-stages is kd_lightning.engine.prestage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class PreStage:
    epochs: int
    loss: Callable[[Any, Any], torch.Tensor]  # (adapted student feature(s), teacher target(s))
    module: nn.Module | None = None  # trained in the stage, frozen (requires_grad False) outside it
    student: bool = False  # the student's layers except its classifier train too
    only: bool = False  # the term acts in this stage alone (weighted by the term's weight)
