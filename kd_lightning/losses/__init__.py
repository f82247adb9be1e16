"""Loss registry: distances and method terms, all `forward(student, teacher, [y, index, epoch]) -> scalar`."""

from kd_lightning.losses import crd, distances, factor, logits, maps, projector, relational, review, vid  # noqa: F401
from kd_lightning.losses.registry import create_loss, forward_extras, list_losses, loss_class, register_loss

__all__ = ["create_loss", "forward_extras", "list_losses", "loss_class", "register_loss"]
