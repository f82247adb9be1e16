"""Loss registry: distances and method terms, all `forward(student, teacher, [y, index, epoch]) -> scalar`.

`registry` holds the registry, `protocol` what a loss may declare beyond `forward` (incl. `PreStage`),
`adapters` the projectors terms use. Every module here is imported, so a new method is a new file with a
`@register_loss("name")` class, nothing else to edit."""

import importlib
import pkgutil

from kd_lightning.losses.registry import create_loss, forward_extras, list_losses, loss_class, register_loss

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")

__all__ = ["create_loss", "forward_extras", "list_losses", "loss_class", "register_loss"]
