"""TeacherFeed: the one way the training steps get teacher features, whether stored or live."""

from __future__ import annotations

import torch

from kd_lightning.teachers.ensemble import TeacherEnsemble, TeacherFeatures
from kd_lightning.teachers.outputs import TeacherOutputs


class TeacherFeed:
    """The teachers of a run and, when it has them, the stores of their outputs. `features(x, slots)` reads
    the stores once they are complete (one gather per store), else runs the teachers on the batch and
    counts those samples (per teacher, as the stores count), for the precompute's accounting."""

    def __init__(self, teachers: TeacherEnsemble, outputs: TeacherOutputs | None = None):
        self.teachers = teachers
        self.outputs = outputs
        self.live_samples = 0  # training samples the teachers ran on during the steps

    def features(self, x: torch.Tensor, slots: torch.Tensor | None) -> TeacherFeatures:
        if self.outputs is not None and slots is not None and self.outputs.complete:
            return self.outputs.get(slots, x.device)
        self.live_samples += len(x) * len(self.teachers.names)
        return self.teachers(x)

    @property
    def computed_samples(self) -> int:
        """Samples × teachers this process ran to make training targets: the precompute and the live steps."""
        return self.live_samples + (self.outputs.computed if self.outputs is not None else 0)
