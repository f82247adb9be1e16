"""The teacher members of a run, built from `teachers.members` (kd_lightning.teachers.ensemble holds them).

Members are built from config: `{arch, checkpoint, taps, weight, fit_if_missing, fit}`. A member
whose checkpoint is missing can be fitted first (supervised, on the same data) and cached on disk,
keyed by a hash of its architecture, its fit settings and the data, so a changed config never reuses
a stale teacher.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.config.run_spec import TeachersSpec, parse_teachers
from kd_lightning.config.specs import FitSpec, MemberSpec
from kd_lightning.data.fingerprint import data_key
from kd_lightning.errors import ConfigError
from kd_lightning.models import create_model, load_weights
from kd_lightning.models.weights import safe_load
from kd_lightning.plain import Plain
from kd_lightning.teachers.ensemble import TeacherEnsemble
from kd_lightning.teachers.fit_once import fit_once, keyed_path

log = logging.getLogger(__name__)


def fitted_teacher_path(
    cache_dir: str | Path,
    data_name: str,
    member: str,
    spec: MemberSpec,
    data_cfg: Mapping[str, Plain],
    content: str | None = None,
) -> Path:
    """The fitted weights' file, keyed by the arch, the fit and the data (config and content fingerprint)."""
    # "order": fits made before the batches followed the fit seed (they followed the run's) are not reused
    key = {
        "arch": spec.arch,
        "fit": spec.fit.identity(),
        "data": data_key(data_cfg, content),
        "order": "fit.seed",
    }
    return keyed_path(Path(cache_dir) / "teachers" / data_name, member, key)


FitFn = Callable[[str, Mapping[str, Any], FitSpec, Path], None]


@dataclass(frozen=True)
class _Resolved:
    """A selected member, checked: its spec (fit seed offset applied), its checkpoint file (None: random or
    torchvision weights) and its architecture."""

    spec: MemberSpec
    path: Path | None
    arch: Mapping[str, Any]


def build_teachers(
    teachers: TeachersSpec | Mapping[str, Plain],
    num_classes: int,
    input_shape: tuple[int, ...],
    data_name: str,
    data_cfg: Mapping[str, Plain],
    cache_dir: str | Path,
    fit_fn: FitFn | None = None,
    dry_run: bool = False,
    content: str | None = None,
) -> TeacherEnsemble | None:
    """Build the ensemble from `teachers.members` (restricted to `teachers.use`), fitting missing members.

    Only a member with `checkpoint: null` is ever fitted, and only into the cache: an explicit checkpoint
    path that does not exist is a configuration error (a typo must not train and write a new teacher).
    With `dry_run` nothing is fitted: a member that would be is built with fresh weights (shapes only)
    and listed in the ensemble's `unfitted`. `teachers` is the parsed group (or the mapping to parse).
    In stages: resolve and check every selected member (a typo in the second fails before the first is
    fitted), then load or fit each, then the frozen ensemble."""
    pool = teachers if isinstance(teachers, TeachersSpec) else parse_teachers(teachers)
    if not pool.members or not pool.selected:
        return None  # teachers=none, whatever an experiment's `use` says
    where = {name: f"teachers.members.{name}" for name in pool.selected}
    resolved = {
        name: _resolve(name, pool, num_classes, data_name, data_cfg, cache_dir, content, where[name])
        for name in pool.selected
    }
    for name, m in resolved.items():
        if (
            m.path is not None
            and not m.spec.checkpoint
            and not m.path.is_file()
            and fit_fn is None
            and not dry_run
        ):
            raise ConfigError(f"teacher {name!r} has no checkpoint at {m.path} and no way to fit it here")
    weights = {name: m.spec.weight for name, m in resolved.items()}
    if sum(weights.values()) <= 0:
        raise ConfigError(f"the teachers' weights {weights} sum to 0; give at least one a weight > 0")
    if pool.fit_seed and all(
        (m.path is None and not m.spec.random_weights) or m.spec.checkpoint for m in resolved.values()
    ):
        raise ConfigError(
            f"teachers.fit_seed={pool.fit_seed} changes nothing: every selected teacher comes from a file or "
            "from torchvision weights, none is fitted here; leave it at 0"
        )
    members: dict[str, nn.Module] = {}
    checkpoints: dict[str, str] = {}
    unfitted: list[str] = []
    for name, m in resolved.items():
        members[name], checkpoint = _load_or_fit(name, m, num_classes, input_shape, fit_fn, dry_run)
        if checkpoint is None:
            unfitted.append(name)
        checkpoints[name] = checkpoint if checkpoint is not None else str(m.path)
    aliases = {name: dict(m.spec.taps) for name, m in resolved.items()}
    ensemble = TeacherEnsemble(members, aliases, weights, checkpoints)
    ensemble.unfitted = unfitted
    return ensemble


def _resolve(
    name: str,
    pool: TeachersSpec,
    num_classes: int,
    data_name: str,
    data_cfg: Mapping[str, Plain],
    cache_dir: str | Path,
    content: str | None,
    where: str,
) -> _Resolved:
    """A selected member checked: where its weights come from, and its architecture. `teachers.fit_seed` is
    added to the fit seed of a member fitted here, so one sweep axis (teachers.fit_seed=0,1,2) refits the
    whole set with other seeds (each fit cached apart)."""
    spec = pool.members[name]
    if pool.fit_seed and not spec.checkpoint:
        spec = replace(spec, fit=replace(spec.fit, seed=spec.fit.seed + pool.fit_seed))
    if spec.checkpoint:
        path = Path(spec.checkpoint)
        if not path.is_file():
            raise ConfigError(
                f"{where}.checkpoint: no file at {path}. Point it at an existing checkpoint, or set "
                f"{where}.checkpoint=null to fit this teacher into the cache under {Path(cache_dir) / 'teachers'}"
            )
        return _Resolved(spec, path, spec.arch if spec.arch is not None else arch_from_file(path, where))
    assert spec.arch is not None  # MemberSpec.check: a member without a checkpoint has an arch
    if spec.random_weights:
        return _Resolved(spec, None, spec.arch)
    if spec.arch.get("weights") and not spec.fit_if_missing:
        # torchvision's pretrained weights are the teacher as they are: nothing to fit or cache
        check_weights_head(spec.arch, num_classes, where)
        return _Resolved(spec, None, spec.arch)
    path = fitted_teacher_path(cache_dir, data_name, name, spec, data_cfg, content)
    if not path.is_file() and not spec.fit_if_missing:
        raise ConfigError(
            f"teacher {name!r} is not fitted yet (no cached checkpoint at {path}) and {where}.fit_if_missing "
            f"is false: set {where}.checkpoint to a weights file, or {where}.fit_if_missing=true"
        )
    return _Resolved(spec, path, spec.arch)


def _load_or_fit(
    name: str,
    m: _Resolved,
    num_classes: int,
    input_shape: tuple[int, ...],
    fit_fn: FitFn | None,
    dry_run: bool,
) -> tuple[nn.Module, str | None]:
    """The member's model and where its weights came from (None: a dry run left it unfitted, fresh weights).
    A member missing from the cache is fitted into it first (once, whichever job of a sweep gets there)."""
    spec, path, arch = m.spec, m.path, m.arch
    # weights the model starts from are not fetched when a checkpoint replaces them all (or for a
    # random-weights control): a teacher loaded from its file needs no download and no source model
    from_file = path is not None and not spec.random_weights
    with torch.random.fork_rng(devices=[]):  # a random-weights teacher depends on its seed alone
        torch.manual_seed(spec.fit.seed)
        built = {
            k: v
            for k, v in arch.items()
            if not ((spec.random_weights or from_file) and k in ("weights", "pretrained"))
        }
        model = create_model(built, num_classes, input_shape)
    if spec.random_weights:
        return model, f"random weights (seed {spec.fit.seed})"
    if path is None:
        return model, f"torchvision weights {arch['weights']}"
    if not path.is_file() and dry_run:
        return model, None
    if not path.is_file():
        log.info("teacher %s: not fitted yet, fitting it into %s (unless a parallel job does)", name, path)
        assert fit_fn is not None
        fit_once(path, lambda: fit_fn(name, arch, spec.fit, path))
    load_weights(model, path, owner=f"teacher {name!r}", arch=arch)
    return model, str(path)


def check_weights_head(arch: Mapping[str, Plain], num_classes: int, where: str) -> None:
    """A teacher taken from torchvision weights keeps their classifier: it must have the data's classes.
    Checked from the weights' metadata, before anything is downloaded."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch["name"])[arch["weights"]]
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f"{where}.arch.weights={arch['weights']!r} is not a torchvision weights name for {arch['name']!r} ({e})"
        ) from None
    classes = len(weights.meta.get("categories") or [])
    if classes != num_classes:
        raise ConfigError(
            f"{where}: torchvision weights {arch['weights']} classify {classes} classes, the data has "
            f"{num_classes}; a teacher is used as it is, so give it a checkpoint made for this data "
            f"({where}.checkpoint), or fine-tune it here from those weights: {where}.fit_if_missing=true"
        )


def arch_from_file(path: Path, where: str) -> dict[str, Plain]:
    """The architecture recorded in a self-describing kd_lightning model file (a run's student.pt)."""
    obj = safe_load(path)
    arch = obj.get("arch") if isinstance(obj, Mapping) else None
    if not isinstance(arch, Mapping) or not arch.get("name"):
        raise ConfigError(
            f"{where}.arch is required: {path} does not record its architecture (only kd_lightning model "
            "files such as a run's student.pt do); set arch: {name: <model>, ...}"
        )
    log.info("%s: architecture read from %s: %s", where, path, dict(arch))
    return {k: v for k, v in arch.items() if k not in ("weights", "pretrained")}
