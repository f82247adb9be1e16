"""results.json: the run's labels (group choices, teacher set, distance) and numbers, written atomically
(temp file + rename), so a crash never leaves half a file."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_lightning.config.run_spec import RunSpec, parse_distill, parse_teachers
from kd_lightning.config.specs import Plain
from kd_lightning.files import read_results, write_json_atomic  # noqa: F401  (results.json's I/O)

GROUPS = ("data", "student", "teachers", "distill", "trainer", "optim", "scheduler", "experiment")


def group_choices(cfg: DictConfig) -> dict[str, Plain]:
    """The config-group choices of this run (from Hydra when available, else the configs' `name` keys)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        chosen = HydraConfig.get().runtime.choices
        return {g: chosen.get(g) for g in GROUPS}
    return {g: (cfg.get(g) or {}).get("name") if isinstance(cfg.get(g), DictConfig) else None for g in GROUPS}


def run_labels(cfg: DictConfig, spec: RunSpec | None = None) -> dict[str, Plain]:
    """What results.json says a run is: the group choices, the teacher set and the distance, from its spec;
    before (or without) one, from the groups that parse, so that a broken key is reported by its owner and
    the label reads "unknown", never by the labelling."""
    labels: dict[str, Any] = group_choices(cfg)
    teachers = spec.teachers if spec is not None else _try(lambda: parse_teachers(_plain(cfg, "teachers")))
    if teachers is not None and teachers.members:
        labels["teacher_fit_seed"] = teachers.fit_seed  # teachers.fit_seed: which fits of the set
    labels["teacher_set"] = teachers.label if teachers is not None else "unknown"
    if spec is not None:
        labels["distance"] = spec.distance_label
    else:
        distill = _try(
            lambda: parse_distill(_plain(cfg, "distill"), bool(teachers and teachers.no_teacher_point))
        )
        labels["distance"] = (
            "unknown"
            if distill is None
            else "+".join(sorted({t.distance for t in distill.terms.values()})) or "none"
        )
    return labels


def _plain(cfg: DictConfig, key: str) -> Any:
    value = cfg.get(key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _try(make: Any) -> Any:
    try:
        return make()
    except Exception:
        return None
