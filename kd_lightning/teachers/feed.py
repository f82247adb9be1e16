"""TeacherFeed: the one way the training steps get teacher features, whether stored or live."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kd_lightning.teachers.ensemble import TeacherEnsemble, TeacherFeatures
from kd_lightning.teachers.outputs import TeacherOutputs


class TeacherFeed:
    """The teachers of a run and, when it has them, the stores of their outputs. `features(x, index, view,
    targets)` reads the stores once they are complete: the rows the loader read with the batch (`targets`, stores
    kept on the host), else one gather per store from its copy on the device; otherwise it runs the teachers
    on the batch and counts those samples (per teacher, as the stores count), for the precompute's
    accounting."""

    def __init__(self, teachers: TeacherEnsemble, outputs: TeacherOutputs | None = None):
        self.teachers = teachers
        self.outputs = outputs
        self.live_samples = 0  # training samples the teachers ran on during the steps

    def features(
        self,
        x: torch.Tensor,
        index: torch.Tensor | None,
        view: torch.Tensor | None = None,
        targets: Mapping[str, Mapping[str, tuple[torch.Tensor, ...]]] | None = None,
    ) -> TeacherFeatures:
        """For the batch `x` of training samples `index`, in recorded views `view` (None without them)."""
        if self.outputs is not None and self.outputs.complete:
            if targets is not None:
                return self.outputs.assemble(targets, x.device)
            if index is not None:
                return self.outputs.get(index, view, x.device)
        self.live_samples += len(x) * len(self.teachers.names)
        return self.teachers(x)

    @property
    def computed_samples(self) -> int:
        """Samples × teachers this process ran to make training targets: the precompute and the live steps."""
        return self.live_samples + (self.outputs.computed if self.outputs is not None else 0)
