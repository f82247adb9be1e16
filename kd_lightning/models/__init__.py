"""Models by name. `registry` (register_model), `factory` (create_model), `torchvision_adapter` (torchvision
classifiers resized to the data), `weights` (safe loading and self-describing model files)."""

from kd_lightning.models import cifar, cifar_mobile, small  # noqa: F401  (registers the architectures)
from kd_lightning.models.factory import create_model
from kd_lightning.models.registry import list_models, register_model
from kd_lightning.models.weights import (
    MODEL_FILE_FORMAT,
    load_model,
    load_pretrained,
    load_weights,
    safe_load,
    save_model,
)

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
