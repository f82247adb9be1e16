"""TeacherEnsemble: frozen members (eval always, no gradients), forwarded under inference mode.

Members are built from config: `{arch, checkpoint, taps, weight, fit_if_missing, fit}`. A member
whose checkpoint is missing can be fitted first (supervised, on the same data) and cached on disk,
keyed by a hash of its architecture, its fit settings and the data, so a changed config never reuses
a stale teacher.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.data.fingerprint import data_key
from kd_lightning.errors import ConfigError, as_int, choices, safe_name
from kd_lightning.fit_cache import fit_once, keyed_path
from kd_lightning.models import create_model, load_weights
from kd_lightning.models.weights import safe_load
from kd_lightning.specs import FitSpec, MemberSpec, parse
from kd_lightning.taps import FeatureTaps

log = logging.getLogger(__name__)

Features = dict[str, torch.Tensor]


class TeacherEnsemble(nn.Module):
    """Frozen teachers. `forward(x)` returns `{member: {tap: tensor}}`, tensors usable as loss targets."""

    def __init__(
        self,
        members: Mapping[str, nn.Module],
        aliases: Mapping[str, Mapping[str, str]] | None = None,
        weights: Mapping[str, float] | None = None,
        checkpoints: Mapping[str, str] | None = None,
    ):
        super().__init__()
        if not members:
            raise ConfigError("a teacher ensemble needs at least one member")
        self.members = nn.ModuleDict(dict(members))
        self.aliases = {n: dict((aliases or {}).get(n, {})) for n in self.members}
        w = {n: float((weights or {}).get(n, 1.0)) for n in self.members}
        total = sum(w.values())
        if total <= 0 or any(v < 0 for v in w.values()):
            raise ConfigError(f"teacher weights must be non-negative and not all zero, got {w}")
        self.weights = {n: v / total for n, v in w.items()}
        self.checkpoints = dict(checkpoints or {})
        self.unfitted: list[str] = []  # dry_run: members that a real run would fit first (fresh weights here)
        self._taps: dict[str, FeatureTaps] = {}
        self.requires_grad_(False)
        super().train(False)
        self.configure_taps([])

    @property
    def names(self) -> list[str]:
        return list(self.members)

    @torch.no_grad()
    def fingerprint(self) -> torch.Tensor:
        """Per-teacher sum and sum of squares of all weights and buffers (float64): equal weights, equal print."""
        rows = []
        for name in self.names:
            tensors = [*self.members[name].parameters(), *self.members[name].buffers()]
            flat = [t.detach().double().flatten() for t in tensors if t.is_floating_point()]
            cat = torch.cat(flat) if flat else torch.zeros(1, dtype=torch.float64)
            rows.append(torch.stack([cat.sum(), cat.square().sum()]))
        return torch.stack(rows)

    def train(self, mode: bool = True) -> TeacherEnsemble:
        """Teachers stay in eval mode whatever the caller asks (Lightning calls .train() every epoch)."""
        return super().train(False)

    def configure_taps(self, taps: Iterable[str]) -> None:
        """Hook the features every member must return (the output is always returned as `logits`)."""
        for t in self._taps.values():
            t.remove()
        taps = sorted(set(taps))
        self._taps = {
            name: FeatureTaps(m, taps, aliases=self.aliases[name], owner=f"teacher {name!r}")
            for name, m in self.members.items()
        }

    def tap_module(self, member: str, tap: str) -> str:
        """The module a member's tap reads (`fc:input`, `logits`, ...), after its aliases."""
        return self._taps[member].specs[tap]

    def forward(self, x: torch.Tensor, names: Iterable[str] | None = None) -> dict[str, Features]:
        """`{member: {tap: tensor}}` for every member, or for `names` only."""
        chosen = self._taps if names is None else {n: self._taps[n] for n in names}
        with torch.inference_mode():
            out = {name: taps(x) for name, taps in chosen.items()}
        # Inference tensors cannot be saved for backward; a clone outside inference mode can.
        return {name: {k: v.clone() for k, v in feats.items()} for name, feats in out.items()}

    def combined_logits(self, feats: Mapping[str, Features]) -> torch.Tensor:
        """Weighted mean of the members' logits (weights normalised to sum to one)."""
        return sum(self.weights[n] * feats[n]["logits"].float() for n in self.members)


def teacher_cache_path(
    cache_dir: str | Path,
    data_name: str,
    member: str,
    spec: MemberSpec,
    data_cfg: Mapping[str, Any],
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


def build_teachers(
    teachers_cfg: Mapping[str, Any],
    num_classes: int,
    input_shape: tuple[int, ...],
    data_name: str,
    data_cfg: Mapping[str, Any],
    cache_dir: str | Path,
    fit_fn: FitFn | None = None,
    dry_run: bool = False,
    content: str | None = None,
) -> TeacherEnsemble | None:
    """Build the ensemble from `teachers.members` (restricted to `teachers.use`), fitting missing members.

    Only a member with `checkpoint: null` is ever fitted, and only into the cache: an explicit checkpoint
    path that does not exist is a configuration error (a typo must not train and write a new teacher).
    With `dry_run` nothing is fitted: a member that would be is built with fresh weights (shapes only)
    and listed in the ensemble's `unfitted`."""
    members_cfg: Mapping[str, Any] = teachers_cfg.get("members") or {}
    if not members_cfg:
        return None  # teachers=none, whatever an experiment's `use` says
    use = teachers_cfg.get("use")
    if use is None:
        selected = list(members_cfg)
    else:
        selected = [use] if isinstance(use, str) else use
        if not isinstance(selected, list | tuple) or not all(isinstance(u, str) for u in selected):
            raise ConfigError(
                f"teachers.use must be null or a list of teacher names from {choices(members_cfg)}, got {use!r}"
            )
        unknown = [u for u in selected if u not in members_cfg]
        if unknown:
            raise ConfigError(
                f"teachers.use names unknown teacher(s) {unknown}; the pool has: {choices(members_cfg)}"
            )
    if not selected:
        return None
    # teacher variance: `teachers.fit_seed` is added to the fit seed of every member fitted here, so one
    # sweep axis (teachers.fit_seed=0,1,2) refits the whole set with other seeds (each fit cached apart)
    offset = as_int("teachers.fit_seed", teachers_cfg.get("fit_seed") or 0, 0)
    # Check every selected member first, so that a typo in the second one fails before the first is fitted.
    specs: dict[str, MemberSpec] = {}
    paths, weights, archs = {}, {}, {}
    for name in selected:
        where = f"teachers.members.{name}"
        safe_name(f"teachers.members.{name}: the teacher name", name)  # it names the teacher's cache files
        spec = specs[name] = parse(MemberSpec, members_cfg[name], where)
        if offset and not spec.checkpoint:
            spec = specs[name] = replace(spec, fit=replace(spec.fit, seed=spec.fit.seed + offset))
        weights[name] = spec.weight
        if spec.checkpoint:
            path = Path(spec.checkpoint)
            if not path.is_file():
                raise ConfigError(
                    f"{where}.checkpoint: no file at {path}. Point it at an existing checkpoint, or set "
                    f"{where}.checkpoint=null to fit this teacher into the cache under {Path(cache_dir) / 'teachers'}"
                )
            archs[name] = spec.arch if spec.arch is not None else arch_from_file(path, where)
        elif spec.random_weights:
            paths[name], archs[name] = None, spec.arch
            continue
        elif spec.arch.get("weights") and not spec.fit_if_missing:
            # torchvision's pretrained weights are the teacher as they are: nothing to fit or cache
            check_weights_head(spec.arch, num_classes, where)
            paths[name], archs[name] = None, spec.arch
            continue
        else:
            path = teacher_cache_path(cache_dir, data_name, name, spec, data_cfg, content)
            archs[name] = spec.arch
            if not path.is_file() and not spec.fit_if_missing:
                raise ConfigError(
                    f"teacher {name!r} is not fitted yet (no cached checkpoint at {path}) and {where}.fit_if_missing "
                    f"is false: set {where}.checkpoint to a weights file, or {where}.fit_if_missing=true"
                )
            if not path.is_file() and fit_fn is None and not dry_run:
                raise ConfigError(f"teacher {name!r} has no checkpoint at {path} and no way to fit it here")
        paths[name] = path
    if sum(weights.values()) <= 0:
        raise ConfigError(f"the teachers' weights {weights} sum to 0; give at least one a weight > 0")
    if offset and all(
        (paths[n] is None and not specs[n].random_weights) or specs[n].checkpoint for n in selected
    ):
        raise ConfigError(
            f"teachers.fit_seed={offset} changes nothing: every selected teacher comes from a file or from "
            "torchvision weights, none is fitted here; leave it at 0"
        )

    members, aliases, checkpoints, unfitted = {}, {}, {}, []
    for name, spec in specs.items():
        path, arch = paths[name], archs[name]
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
            checkpoints[name] = f"random weights (seed {spec.fit.seed})"
        elif path is None:
            checkpoints[name] = f"torchvision weights {arch['weights']}"
        elif not path.is_file() and dry_run:
            unfitted.append(name)
        else:
            if not path.is_file():
                log.info(
                    "teacher %s: not fitted yet, fitting it into %s (unless a parallel job does)", name, path
                )
                fit_once(path, lambda n=name, s=spec, p=path: fit_fn(n, s.arch, s.fit, p))
            load_weights(model, path, owner=f"teacher {name!r}", arch=arch)
        members[name] = model
        aliases[name] = dict(spec.taps)
        checkpoints.setdefault(name, str(path))
    ensemble = TeacherEnsemble(members, aliases, weights, checkpoints)
    ensemble.unfitted = unfitted
    return ensemble


def check_weights_head(arch: Mapping[str, Any], num_classes: int, where: str) -> None:
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


def arch_from_file(path: Path, where: str) -> dict[str, Any]:
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
