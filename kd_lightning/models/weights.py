"""Weight I/O: load checkpoints safely (weights_only=True), transfer weights, write self-describing files.

Accepted inputs everywhere: our model file (`save_model`), a Lightning checkpoint of a
DistillationModule (the student's keys), a plain state_dict, and the `{'model': state_dict, ...}` wrapper
of released checkpoints (RepDistiller, mdistiller).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.files import save_torch_atomic
from kd_lightning.models.torchvision_adapter import last_linear
from kd_lightning.plain import Plain

MODEL_FILE_FORMAT = "kd_lightning.model/1"


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Transfer learning: every weight from `path` except a classifier head of another class count,
    which keeps its fresh initialisation. Returns the names of the weights left out.

    Anything else that does not match (missing, unexpected or reshaped weights) is an error."""
    sd = extract_state_dict(safe_load(path), path)
    own = model.state_dict()
    head = last_linear(model)[0] if any(isinstance(m, nn.Linear) for m in model.modules()) else None
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


def safe_load(path: str | os.PathLike) -> object:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise ConfigError(
            f"{path} is empty (0 bytes): a save or a copy was cut short; write or fetch the file again"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(
            f"refused to load {path}: it is not a plain weights file (weights_only=True rejected it: "
            f"{str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # zip/pickle format errors, truncated files
        raise ConfigError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _strip_data_parallel(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nn.DataParallel / DDP save every key under `module.`; the model itself has none."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def extract_state_dict(obj: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and "state_dict" not in obj:
        obj = obj["model"]  # released checkpoints: {'epoch', 'model': state_dict, 'best_acc', 'optimizer'}
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = dict(obj["state_dict"])
        # Lightning checkpoint of a DistillationModule: keep the student's keys only.
        if any(k.startswith("student.") for k in sd):
            sd = {k[len("student.") :]: v for k, v in sd.items() if k.startswith("student.")}
        return sd
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _strip_data_parallel(dict(obj))
    raise ConfigError(
        f"{path} holds no state_dict (found {type(obj).__name__}); expected a model weights file"
    )


def load_weights(
    model: nn.Module, path: str | os.PathLike, owner: str = "model", arch: Mapping[str, Plain] | None = None
) -> dict[str, object]:
    """Strictly load weights from our model file, a Lightning checkpoint or a plain state_dict.

    A head of the wrong size is reported as a class-count mismatch, naming both counts. `arch`, the
    configured architecture, is shown next to the file's own in a mismatch error.
    """
    obj = safe_load(path)
    sd = extract_state_dict(obj, path)
    head = (
        last_linear(model)[0] + ".weight" if any(isinstance(m, nn.Linear) for m in model.modules()) else None
    )
    if head and head in sd and sd[head].shape[0] != model.get_submodule(head[: -len(".weight")]).out_features:
        raise ConfigError(
            f"{owner}: checkpoint {path} has a {sd[head].shape[0]}-class head but the dataset has "
            f"{model.get_submodule(head[: -len('.weight')]).out_features} classes; use a checkpoint made for this dataset"
        )
    file_arch = obj.get("arch") if isinstance(obj, Mapping) else None
    check_fits(model, sd, path, owner, file_arch, arch)
    model.load_state_dict(sd, strict=True)
    return dict(obj) if isinstance(obj, Mapping) else {}


def check_fits(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    owner: str,
    file_arch: object,
    arch: Mapping[str, Plain] | None,
) -> None:
    """A ConfigError naming the keys when `sd` does not load strictly into `model` (never torch's raw
    size-mismatch RuntimeError)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        archs = ""
        if isinstance(file_arch, Mapping):
            archs = f": the file was made for arch {dict(file_arch)}"
            if arch is not None:
                archs += f", the config asks for arch {dict(arch)}"
        elif arch is not None:
            archs = f" (config arch {dict(arch)})"
        detail = "; ".join(
            f"{label} {keys[:4]}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if keys
        )
        raise ConfigError(f"{owner}: checkpoint {path} does not fit {type(model).__name__}{archs} ({detail})")


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    spec: Mapping[str, Plain],
    num_classes: int,
    input_shape: tuple[int, ...],
    meta: Mapping[str, Plain] | None = None,
) -> Path:
    """Write a self-describing model file (plain tensors and primitives: loads with weights_only=True).

    Written to a temporary name and renamed, so a crash never leaves a half-written file behind.
    """
    arch = {k: v for k, v in dict(spec).items() if k not in ("checkpoint", "taps", "pretrained")}
    payload = {
        "format": MODEL_FILE_FORMAT,
        "arch": arch,
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    return save_torch_atomic(path, payload)
