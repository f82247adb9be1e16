"""results.json: the run's labels (group choices, teacher set, distance) and numbers, written atomically
(temp file + rename), so a crash never leaves half a file."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from kd_lightning.files import atomic_write


def _clean(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # never let an odd value cost the results file


def write_json_atomic(path: str | Path, payload: Mapping[str, Any]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(_clean(payload), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def read_results(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


GROUPS = ("data", "student", "teachers", "distill", "trainer", "optim", "scheduler", "experiment")


def group_choices(cfg: DictConfig) -> dict[str, Any]:
    """The config-group choices of this run (from Hydra when available, else the configs' `name` keys)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        chosen = HydraConfig.get().runtime.choices
        return {g: chosen.get(g) for g in GROUPS}
    return {g: (cfg.get(g) or {}).get("name") if isinstance(cfg.get(g), DictConfig) else None for g in GROUPS}


def teacher_set_label(cfg: DictConfig) -> str:
    """`cnn_a+cnn_b`: the teachers this run uses, in pool order of `teachers.use` ("none" without any)."""
    teachers = OmegaConf.to_container(cfg.teachers, resolve=True) if cfg.get("teachers") else {}
    members = list(teachers.get("members") or {})
    use = teachers.get("use")
    used = members if use is None else ([use] if isinstance(use, str) else use)
    spec = teachers.get("members") or {}

    def name(u: str) -> str:  # a random-weight control is another teacher than the fitted one
        return f"{u}(random)" if (spec.get(u) or {}).get("random_weights") else str(u)

    return "+".join(name(u) for u in (used if isinstance(used, list) else []) if u in members) or "none"


def distance_label(cfg: DictConfig) -> str:
    from kd_lightning.core.objective import active_terms
    from kd_lightning.engine.build import no_teacher_point

    if no_teacher_point(cfg):
        return "none"
    terms = active_terms(OmegaConf.to_container(cfg.distill, resolve=True) or {})
    return "+".join(sorted({t.distance for t in terms.values()})) or "none"


def run_labels(cfg: DictConfig) -> dict[str, Any]:
    """What results.json says a run is, before anything is checked: a broken key is reported by its owner
    (the label reads "unknown"), never by the labelling."""
    labels: dict[str, Any] = group_choices(cfg)
    teachers = cfg.get("teachers")
    if isinstance(teachers, DictConfig) and teachers.get("members"):
        labels["teacher_fit_seed"] = teachers.get("fit_seed", 0)  # teachers.fit_seed: which fits of the set
    for key, fn in (("teacher_set", teacher_set_label), ("distance", distance_label)):
        try:
            labels[key] = fn(cfg)
        except Exception:
            labels[key] = "unknown"
    return labels
