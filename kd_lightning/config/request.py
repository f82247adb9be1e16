"""The composed config, read once: what a run is asked to do (`RunRequest`), for `run()` and everything below.

Hydra hands `kd-train` a composed config; `read_request` is the one place that reads it. It parses the
config into a RunSpec (or keeps the ConfigError that parsing raised, for the run to report once it owns its
folder) and takes the few keys a run needs before, or without, a spec: its folder, `resume`,
`overwrite`, the seed, and the labels results.json carries. Nothing after this reads the composed config;
what a run recorded is `spec.resolved`, plain data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

from kd_lightning.config.hydra import to_plain
from kd_lightning.config.resolvers import register_resolvers
from kd_lightning.config.run_spec import RunSpec, parse_distill, parse_run, parse_teachers
from kd_lightning.errors import ConfigError
from kd_lightning.plain import Plain, plain_map

GROUPS = ("data", "student", "teachers", "distill", "trainer", "optim", "scheduler", "experiment")
T = TypeVar("T")

register_resolvers()  # the configs' ${kd_...} resolvers, also for run() called through the API


@dataclass(frozen=True)
class RunRequest:
    """A composed config, read: the spec (None when the config does not parse: `problem` says why) and the
    keys a run reads before it has one."""

    output_dir: Path
    resume: str | None
    overwrite: bool
    seed: Plain
    labels: dict[str, Plain] = field(default_factory=dict)
    spec: RunSpec | None = None
    problem: ConfigError | None = None


def read_request(cfg: DictConfig | Mapping[str, Plain]) -> RunRequest:
    """`cfg` (composed by Hydra, or plain data) read once. A config that does not parse still gives a request:
    the run then fails with `problem` once it owns its folder, so results.json records the error."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    try:
        spec, problem = parse_run(node), None
    except ConfigError as e:
        spec, problem = None, e
    resume = node.get("resume")
    return RunRequest(
        output_dir=Path(node.paths.output_dir),
        resume=None if resume is None else str(resume),
        overwrite=bool(node.get("overwrite")),
        seed=node.get("seed"),
        labels=run_labels(node, spec),
        spec=spec,
        problem=problem,
    )


def group_choices(cfg: DictConfig) -> dict[str, Plain]:
    """The config-group choices of this run (from Hydra when available, else the configs' `name` keys)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        chosen = HydraConfig.get().runtime.choices
        return {g: chosen.get(g) for g in GROUPS}
    return {g: (cfg.get(g) or {}).get("name") if isinstance(cfg.get(g), DictConfig) else None for g in GROUPS}


def run_labels(cfg: DictConfig, spec: RunSpec | None = None) -> dict[str, Plain]:
    """What results.json says a run is: the group choices, the teacher set and the distance, from its spec;
    without one, from the groups that parse, so that a broken key is reported by its owner and the label
    reads "unknown", never by the labelling."""
    labels: dict[str, Plain] = group_choices(cfg)
    teachers = spec.teachers if spec is not None else _try(lambda: parse_teachers(_plain(cfg, "teachers")))
    if teachers is not None and teachers.members:
        labels["teacher_fit_seed"] = teachers.fit_seed  # teachers.fit_seed: which fits of the set
    labels["teacher_set"] = teachers.label if teachers is not None else "unknown"
    if spec is not None:
        labels["distance"] = spec.distance_label
        return labels
    no_teacher = bool(teachers and teachers.no_teacher_point)
    distill = _try(lambda: parse_distill(_plain(cfg, "distill"), no_teacher))
    labels["distance"] = (
        "unknown"
        if distill is None
        else "+".join(sorted({t.distance for t in distill.terms.values()})) or "none"
    )
    return labels


def _plain(cfg: DictConfig, key: str) -> Mapping[str, Plain] | None:
    value = to_plain(cfg.get(key), key)
    return None if value is None else plain_map(value, key)


def _try(make: Callable[[], T]) -> T | None:
    try:
        return make()
    except Exception:
        return None
