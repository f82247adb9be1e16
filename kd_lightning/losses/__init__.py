"""Loss registry: distances and method terms, all `forward(student, teacher) -> scalar`."""

from kd_lightning.losses import distances  # noqa: F401  (registers)
from kd_lightning.losses.registry import create_loss, list_losses, register_loss

__all__ = ["create_loss", "list_losses", "register_loss"]
