"""`pretrained:` in a student or teacher arch: start from weights learnt on a source task.

Forms (Thapa 2022, transfer learning):
- a path: a kd_lightning model file, a Lightning checkpoint or a state_dict;
- for a torchvision architecture, the name of its published weights (`IMAGENET1K_V1`, `DEFAULT`): the
  same as `weights:` (downloaded once by torchvision, the only network use, and only when asked for);
- a mapping `{checkpoint, fit_if_missing, data, fit}`: when `checkpoint` is null or missing and
  `fit_if_missing` is true, the model is first trained on the source task `data` (a full data config)
  and cached under `paths.cache_dir/pretrained/`, keyed by arch, fit and source data.
A classifier head of another class count is re-initialised (see `models.load_pretrained`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kd_lightning.config.specs import FitSpec, PretrainedSpec, parse
from kd_lightning.data.fingerprint import data_key
from kd_lightning.errors import ConfigError
from kd_lightning.plain import Plain
from kd_lightning.teachers.fit_once import fit_once, keyed_path

log = logging.getLogger(__name__)

SourceFitFn = Callable[[Mapping[str, Any], Mapping[str, Any], FitSpec, Path], None]


def _torchvision_weights(name: str) -> list[str]:
    """Names of the published weights of a torchvision architecture ([] for other models)."""
    import torchvision

    try:
        return ["DEFAULT", *(w.name for w in torchvision.models.get_model_weights(name))]
    except (ValueError, KeyError):
        return []


def pretrained_cache_path(
    cache_dir: str | Path,
    arch: Mapping[str, Plain],
    data: Mapping[str, Plain],
    fit: FitSpec,
    content: str | None = None,
) -> Path:
    key = {"arch": arch, "fit": fit.identity(), "data": data_key(data, content)}
    return keyed_path(Path(cache_dir) / "pretrained", str(arch.get("name")), key)


def resolve_pretrained(
    owner: str,
    spec: Mapping[str, Plain],
    cache_dir: str | Path,
    fit_fn: SourceFitFn | None,
    content_of: Callable[[Mapping[str, Plain]], str | None] | None = None,
) -> dict[str, Plain]:
    """`spec` with `pretrained` as a checkpoint path (fitted on the source task first when needed).
    `content_of(data)`: the fingerprint of the source task's files (None for generated data)."""
    spec = dict(spec)
    p = spec.get("pretrained")
    if p is None:
        return spec
    if isinstance(p, str):
        if Path(p).is_file():
            return spec
        weights = _torchvision_weights(str(spec.get("name")))
        if weights and p in weights:
            spec["weights"], spec["pretrained"] = p, None
            return spec
        hint = f"; or torchvision weights of {spec.get('name')!r}: {', '.join(weights)}" if weights else ""
        raise ConfigError(f"{owner}.pretrained: checkpoint file not found: {p}{hint}")
    if not isinstance(p, Mapping):
        keys = ", ".join(f.name for f in dataclasses.fields(PretrainedSpec))
        raise ConfigError(
            f"{owner}.pretrained must be null, a checkpoint path or a mapping with keys {keys}, got {p!r}"
        )
    ps = parse(PretrainedSpec, p, f"{owner}.pretrained")
    arch = {k: v for k, v in spec.items() if k not in ("pretrained", "checkpoint", "taps")}
    if ps.checkpoint:
        path = Path(ps.checkpoint)
    elif ps.data is not None and ps.data.get("_target_"):
        content = content_of(ps.data) if content_of is not None else None
        path = pretrained_cache_path(cache_dir, arch, ps.data, ps.fit, content)
    else:
        raise ConfigError(
            f"{owner}.pretrained needs a checkpoint path, or `data` (the source task's data config, with "
            "_target_) and fit_if_missing: true to pre-train on it"
        )
    if not path.is_file():
        if not ps.fit_if_missing or ps.data is None:
            raise ConfigError(
                f"{owner}.pretrained.checkpoint not found: {path}; give an existing file, or set "
                f"{owner}.pretrained.fit_if_missing: true with {owner}.pretrained.data (the source task)"
            )
        if fit_fn is None:
            raise ConfigError(f"{owner}.pretrained: no checkpoint at {path} and no way to pre-train here")
        log.info("%s: pre-training on the source task → %s (unless a parallel job does)", owner, path)
        source, fit = ps.data, fit_fn
        fit_once(path, lambda: fit(arch, source or {}, ps.fit, path))
    spec["pretrained"] = str(path)
    return spec
