"""Models by name. `registry` (register_model), `factory` (create_model, load_model), `torchvision_adapter`
(torchvision classifiers resized to the data), `weights` (safe state-dict I/O, self-describing model files),
`taps` (features by module name). Every module here is imported, so a new model file is picked up."""

import importlib
import pkgutil

from kd_lightning.models.factory import create_model, load_model
from kd_lightning.models.registry import list_models, register_model
from kd_lightning.models.weights import (
    MODEL_FILE_FORMAT,
    load_pretrained,
    load_weights,
    safe_load,
    save_model,
)

# every model file registers its architectures when imported: a new file here needs no edit of this one
for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")

__all__ = [
    "MODEL_FILE_FORMAT",
    "create_model",
    "list_models",
    "load_model",
    "load_pretrained",
    "load_weights",
    "register_model",
    "safe_load",
    "save_model",
]
