"""create_model: a model by name, from our registry first, then any torchvision classifier (timm's factory)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import nn

from kd_lightning.errors import ConfigError, choices
from kd_lightning.models.registry import call_model_fn, get_model_fn, list_models
from kd_lightning.models.torchvision_adapter import torchvision_model, torchvision_names
from kd_lightning.models.weights import (
    MODEL_FILE_FORMAT,
    check_fits,
    load_pretrained,
    load_weights,
    safe_load,
)
from kd_lightning.plain import Plain, plain_str

# Keys of a model spec that are not arguments of the architecture function.
SPEC_KEYS = {"name", "source", "checkpoint", "weights", "small_input", "taps", "pretrained"}
# `source` picks where `name` is looked up: our registry first, then torchvision (default); or torchvision
# only, for names both have (vgg11 is RepDistiller's CIFAR VGG here, torchvision's ImageNet VGG there).
SOURCES = ("auto", "torchvision")


def create_model(spec: Mapping[str, Plain], num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Build `spec.name` (registry or torchvision) and load `spec.checkpoint` when given."""
    spec = dict(spec)
    name = spec.get("name")
    if not name or not isinstance(name, str):
        raise ConfigError(
            f"a model spec needs a 'name' (a string), got {name!r}; registered models: {choices(list_models())}"
        )
    kwargs = {k: v for k, v in spec.items() if k not in SPEC_KEYS}
    source = spec.get("source") or "auto"
    if source not in SOURCES:
        raise ConfigError(f"model {name!r}: source must be one of {choices(SOURCES)}, got {source!r}")
    fn = get_model_fn(name) if source == "auto" else None
    if fn is not None:
        if spec.get("weights"):
            raise ConfigError(f"model {name!r} has no torchvision weights; use 'checkpoint: <file>' instead")
        model = call_model_fn(name, fn, num_classes, input_shape, kwargs)
    elif name in torchvision_names():
        weights = spec.get("weights")
        if weights is not None and not isinstance(weights, str):
            raise ConfigError(f"model {name!r}: weights must be a torchvision weights name, got {weights!r}")
        model = torchvision_model(
            name, num_classes, input_shape, weights, bool(spec.get("small_input", False)), kwargs
        )
    elif source == "torchvision":
        raise ConfigError(
            f"model {name!r} (source: torchvision) is not a torchvision classifier; see "
            "torchvision.models.list_models(), or drop source to use our registry: "
            f"{choices(list_models())}"
        )
    else:
        raise ConfigError(
            f"unknown model {name!r}; registered: {choices(list_models())}; "
            "or any torchvision classifier name (torchvision.models.list_models())"
        )
    if spec.get("pretrained"):
        load_pretrained(model, _pretrained_path(spec["pretrained"], name))
    if spec.get("checkpoint"):
        load_weights(model, plain_str(spec["checkpoint"], f"model {name!r}: checkpoint"))
    return model


def _pretrained_path(value: object, name: str) -> str:
    if isinstance(value, str | os.PathLike):
        return str(value)
    raise ConfigError(
        f"model {name!r}: pretrained must be a checkpoint path here, got {value!r} (a pretrained mapping "
        "{checkpoint, fit_if_missing, data, fit} is resolved by kd-train before the model is built)"
    )


def load_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by `save_model` (a student exported by kd-train loads alone, no teachers)."""
    obj = safe_load(path)
    if not (isinstance(obj, Mapping) and obj.get("format") == MODEL_FILE_FORMAT):
        raise ConfigError(f"{path} is not a kd_lightning model file (format {MODEL_FILE_FORMAT!r})")
    arch = dict(obj["arch"])
    arch.pop("weights", None)  # the file holds the weights already
    arch.pop("pretrained", None)
    try:
        model = create_model(arch, int(obj["num_classes"]), tuple(obj["input_shape"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"{path}: its recorded architecture cannot be built ({type(e).__name__}: {e})"
        ) from None
    sd = obj.get("state_dict")
    if not isinstance(sd, Mapping):
        raise ConfigError(f"{path} holds no state_dict; expected a model file written by kd_lightning")
    try:
        check_fits(model, sd, path, "load_model", None, None)
    except ConfigError as e:
        detail = str(e).rsplit(" (", 1)[-1].rstrip(")")
        raise ConfigError(
            f"{path}: its weights do not fit the architecture it records ({dict(arch)}): {detail}; the file "
            "was edited or damaged, export it again"
        ) from None
    model.load_state_dict(sd, strict=True)
    return model
