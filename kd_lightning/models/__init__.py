"""Build models by name: our registry first, then any torchvision classifier; load weights safely."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.errors import ConfigError, choices
from kd_lightning.models import cifar, small  # noqa: F401  (registers the architectures)
from kd_lightning.models.registry import call_model_fn, get_model_fn, list_models, register_model

__all__ = [
    "MODEL_FILE_FORMAT",
    "create_model",
    "list_models",
    "load_model",
    "load_weights",
    "register_model",
    "save_model",
]

MODEL_FILE_FORMAT = "kd_lightning.model/1"
# Keys of a model spec that are not arguments of the architecture function.
_SPEC_KEYS = {"name", "checkpoint", "weights", "small_input", "taps", "pretrained"}


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear classifier head to resize")
    return linears[-1]


def _torchvision_model(
    name: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    weights: str | None,
    small_input: bool,
    kwargs: dict,
) -> nn.Module:
    import torchvision

    if weights:
        # Pretrained weights carry their own head size; replace the head afterwards.
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
        head_name, head = _last_linear(model)
        if head.out_features != num_classes:
            _replace_module(model, head_name, nn.Linear(head.in_features, num_classes))
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs and len(input_shape) == 3:
        conv_name, conv = convs[0]
        cin = input_shape[0]
        stem_small = small_input and hasattr(model, "maxpool")
        if conv.in_channels != cin or stem_small:
            k, s, p = ((3, 3), 1, 1) if stem_small else (conv.kernel_size, conv.stride, conv.padding)
            new = nn.Conv2d(cin, conv.out_channels, k, s, p, bias=conv.bias is not None)
            if weights and not stem_small:
                with torch.no_grad():  # keep pretrained filters: average over the RGB channels
                    new.weight.copy_(conv.weight.mean(1, keepdim=True).expand_as(new.weight))
            _replace_module(model, conv_name, new)
        if stem_small:
            model.maxpool = nn.Identity()
    if small_input and not hasattr(model, "maxpool"):
        raise ConfigError(
            f"small_input=true is supported for ResNet-style torchvision models only, not {name!r}"
        )
    return model


def create_model(spec: Mapping[str, Any], num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Build `spec.name` (registry or torchvision) and load `spec.checkpoint` when given."""
    spec = dict(spec)
    name = spec.get("name")
    if not name or not isinstance(name, str):
        raise ConfigError(
            f"a model spec needs a 'name' (a string), got {name!r}; registered models: {choices(list_models())}"
        )
    kwargs = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
    fn = get_model_fn(name)
    if fn is not None:
        if spec.get("weights"):
            raise ConfigError(f"model {name!r} has no torchvision weights; use 'checkpoint: <file>' instead")
        model = call_model_fn(name, fn, num_classes, input_shape, kwargs)
    elif name in _torchvision_names():
        model = _torchvision_model(
            name, num_classes, input_shape, spec.get("weights"), bool(spec.get("small_input", False)), kwargs
        )
    else:
        raise ConfigError(
            f"unknown model {name!r}; registered: {choices(list_models())}; "
            "or any torchvision classifier name (torchvision.models.list_models())"
        )
    if spec.get("pretrained"):
        load_pretrained(model, _pretrained_path(spec["pretrained"], name))
    if spec.get("checkpoint"):
        load_weights(model, spec["checkpoint"])
    return model


def _pretrained_path(value: Any, name: str) -> str:
    if isinstance(value, str | os.PathLike):
        return str(value)
    raise ConfigError(
        f"model {name!r}: pretrained must be a checkpoint path here, got {value!r} (a pretrained mapping "
        "{checkpoint, fit_if_missing, data, fit} is resolved by kd-train before the model is built)"
    )


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Transfer learning: every weight from `path` except a classifier head of another class count,
    which keeps its fresh initialisation. Returns the names of the weights left out.

    Anything else that does not match (missing, unexpected or reshaped weights) is an error."""
    sd = _extract_state_dict(_safe_load(path), path)
    own = model.state_dict()
    head = _last_linear(model)[0] if any(isinstance(m, nn.Linear) for m in model.modules()) else None
    head_keys = {f"{head}.weight", f"{head}.bias"} if head else set()
    mismatched = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    dropped = [k for k in mismatched if k in head_keys]
    if dropped:  # a new head: drop both of its tensors
        dropped = sorted(k for k in head_keys if k in sd)
    mismatched = [k for k in mismatched if k not in dropped]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected or mismatched:
        raise ConfigError(
            f"pretrained weights {path} do not fit {type(model).__name__}: missing keys {missing[:4]}, "
            f"unexpected keys {unexpected[:4]}, shape mismatches {mismatched[:4]}"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k not in dropped}, strict=not dropped)
    return dropped


def _safe_load(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(
            f"refused to load {path}: it is not a plain weights file (weights_only=True rejected it: "
            f"{str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # zip/pickle format errors, truncated files
        raise ConfigError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _extract_state_dict(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = dict(obj["state_dict"])
        # Lightning checkpoint of a DistillationModule: keep the student's keys only.
        if any(k.startswith("student.") for k in sd):
            sd = {k[len("student.") :]: v for k, v in sd.items() if k.startswith("student.")}
        return sd
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise ConfigError(
        f"{path} holds no state_dict (found {type(obj).__name__}); expected a model weights file"
    )


def load_weights(model: nn.Module, path: str | os.PathLike, owner: str = "model") -> dict[str, Any]:
    """Strictly load weights from our model file, a Lightning checkpoint or a plain state_dict.

    A head of the wrong size is reported as a class-count mismatch, naming both counts.
    """
    obj = _safe_load(path)
    sd = _extract_state_dict(obj, path)
    head = (
        _last_linear(model)[0] + ".weight" if any(isinstance(m, nn.Linear) for m in model.modules()) else None
    )
    if head and head in sd and sd[head].shape[0] != model.get_submodule(head[: -len(".weight")]).out_features:
        raise ConfigError(
            f"{owner}: checkpoint {path} has a {sd[head].shape[0]}-class head but the dataset has "
            f"{model.get_submodule(head[: -len('.weight')]).out_features} classes; use a checkpoint made for this dataset"
        )
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        arch = obj.get("arch") if isinstance(obj, Mapping) else None
        made_for = f" (it was made for {arch.get('name')!r})" if isinstance(arch, Mapping) else ""
        raise ConfigError(
            f"checkpoint {path} does not fit {type(model).__name__}{made_for}: "
            f"missing keys {missing[:4]}, unexpected keys {unexpected[:4]}, shape mismatches {mismatched[:4]}"
        )
    model.load_state_dict(sd, strict=True)
    return dict(obj) if isinstance(obj, Mapping) else {}


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    spec: Mapping[str, Any],
    num_classes: int,
    input_shape: tuple[int, ...],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write a self-describing model file (plain tensors and primitives: loads with weights_only=True).

    Written to a temporary name and renamed, so a crash never leaves a half-written file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = {k: v for k, v in dict(spec).items() if k not in ("checkpoint", "taps", "pretrained")}
    payload = {
        "format": MODEL_FILE_FORMAT,
        "arch": arch,
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by `save_model` (a student exported by kd-train loads alone, no teachers)."""
    obj = _safe_load(path)
    if not (isinstance(obj, Mapping) and obj.get("format") == MODEL_FILE_FORMAT):
        raise ConfigError(f"{path} is not a kd_lightning model file (format {MODEL_FILE_FORMAT!r})")
    arch = dict(obj["arch"])
    arch.pop("weights", None)  # the file holds the weights already
    arch.pop("pretrained", None)
    model = create_model(arch, int(obj["num_classes"]), tuple(obj["input_shape"]))
    model.load_state_dict(obj["state_dict"], strict=True)
    return model
