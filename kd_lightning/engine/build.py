"""Build the objects of one run from its config: datamodule, teachers, student and module.

Everything here runs before training, so configuration errors surface before the first step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from kd_lightning.config.hydra import to_dict
from kd_lightning.config.optim import build_optim
from kd_lightning.config.specs import CacheSpec, FitSpec, PerfSpec, parse
from kd_lightning.core.module import DistillationModule
from kd_lightning.core.objective import Objective, build_objective
from kd_lightning.core.stage_terms import expand_stage_terms
from kd_lightning.data.base import TensorDataModule
from kd_lightning.data.fingerprint import data_key
from kd_lightning.data.from_config import instantiate_datamodule
from kd_lightning.engine.fitting import fit_accelerator, fit_model
from kd_lightning.engine.pretrain import resolve_pretrained
from kd_lightning.errors import ConfigError
from kd_lightning.models import create_model
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.teachers.ensemble import TeacherEnsemble
from kd_lightning.teachers.members import build_teachers
from kd_lightning.teachers.outputs import TeacherOutputs
from kd_lightning.teachers.store import TapStore, TopKLogitsStore, file_digest, model_digest, store_key

log = logging.getLogger(__name__)


def model_spec(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A student/teacher arch config as a plain dict."""
    return dict(to_dict(cfg))


@torch.no_grad()
def probe_shapes(model_taps: FeatureTaps, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of every tap, from one dry batch run in eval mode (no BN statistics updated)."""
    model = model_taps.model
    was_training = model.training
    model.eval()
    feats = model_taps(x)
    model.train(was_training)
    return {k: tuple(v.shape[1:]) for k, v in feats.items()}


def resolve_pretrained_models(cfg: DictConfig) -> None:
    """Turn every `pretrained:` mapping (student and teacher members) into a checkpoint path, pre-training
    on the source task first where the file is missing; `cfg` is updated in place."""
    accelerator = fit_accelerator(cfg)

    def fit(arch: Mapping[str, Any], data_cfg: Mapping[str, Any], fit_spec: FitSpec, path: Path) -> None:
        source = instantiate_datamodule(data_cfg)
        source.setup("fit")
        _, acc = fit_model(
            dict(arch), source, fit_spec, accelerator, out_path=path, meta={"source": source.name}
        )
        log.info(
            "pre-trained %s on %s: source test acc %.4f → %s", arch.get("name"), source.describe(), acc, path
        )

    def content_of(data_cfg: Mapping[str, Any]) -> str | None:
        return instantiate_datamodule(data_cfg).content_fingerprint()

    student = to_dict(cfg.student) or {}
    if isinstance(student.get("pretrained"), Mapping | str):
        resolved = resolve_pretrained("student", student, cfg.paths.cache_dir, fit, content_of)
        with open_dict(cfg):
            cfg.student.pretrained = resolved["pretrained"]
            if resolved.get("weights"):  # a torchvision weights name given as `pretrained`
                cfg.student.weights = resolved["weights"]
    members = (to_dict(cfg.teachers) or {}).get("members") or {}
    for name, member in members.items():
        arch = (member or {}).get("arch") or {}
        if isinstance(arch, Mapping) and arch.get("pretrained") is not None:
            resolved = resolve_pretrained(
                f"teachers.members.{name}.arch", arch, cfg.paths.cache_dir, fit, content_of
            )
            with open_dict(cfg):
                cfg.teachers.members[name].arch.pretrained = resolved["pretrained"]
                if resolved.get("weights"):
                    cfg.teachers.members[name].arch.weights = resolved["weights"]


def build_teacher_ensemble(cfg: DictConfig, dm: TensorDataModule, data_name: str) -> TeacherEnsemble | None:
    accelerator = fit_accelerator(cfg)

    def fit(name: str, arch: Mapping[str, Any], fit_spec: FitSpec, path: Path) -> None:
        _, acc = fit_model(dict(arch), dm, fit_spec, accelerator, out_path=path, meta={"teacher": name})
        log.info("fitted teacher %s: test acc %.4f → %s", name, acc, path)

    return build_teachers(
        to_dict(cfg.teachers) or {},
        dm.num_classes,
        dm.input_shape,
        data_name,
        to_dict(cfg.data),
        cfg.paths.cache_dir,
        fit,
        dry_run=bool(cfg.get("dry_run")),
        content=dm.content_fingerprint(),
    )


def no_teacher_point(cfg: DictConfig) -> bool:
    """`teachers.use=[]` (an empty subset, e.g. sweep=teacher_subsets with sweep_include_none=true): the
    same job without any teacher. Its distill terms are dropped, the label loss gets weight 1."""
    teachers = cfg.get("teachers") or {}
    use = teachers.get("use") if hasattr(teachers, "get") else None
    return use is not None and not isinstance(use, str) and len(use) == 0 and bool(teachers.get("members"))


def build_module(
    cfg: DictConfig, dm: TensorDataModule, teachers: TeacherEnsemble | None
) -> DistillationModule:
    """Student + objective sized on one dry batch (adapters get their shapes here, before training), the
    optimiser and schedule, the teacher-output cache and the perf switches."""
    distill = to_dict(cfg.distill) or {}
    if teachers is None and no_teacher_point(cfg):
        log.info("teachers.use=[]: no teacher, the student learns from its labels alone (CE, weight 1)")
        distill = {"ce_weight": 1.0, "terms": {}}
    optim = build_optim(to_dict(cfg.get("optim")), to_dict(cfg.get("scheduler")))
    perf = parse(PerfSpec, to_dict(cfg.get("perf")), "perf")
    student_spec = model_spec(cfg.student)
    student = create_model(student_spec, dm.num_classes, dm.input_shape)
    distill = expand_stage_terms(distill, student, teachers)
    student_aliases = dict(student_spec.get("taps") or {})
    student_taps = FeatureTaps(
        student, Objective.student_taps(distill), aliases=student_aliases, owner="student"
    )
    batch = dm.prepare_batch(next(iter(dm.train_dataloader())), train=False)
    x = batch.x[: min(8, len(batch.x))]
    student_shapes = probe_shapes(student_taps, x)
    _check_logits("student", student_shapes["logits"], dm.num_classes)
    teacher_shapes = None
    if teachers is not None:
        teachers.configure_taps(Objective.teacher_taps(distill))
        feats = teachers(x)
        teacher_shapes = {m: {k: tuple(v.shape[1:]) for k, v in f.items()} for m, f in feats.items()}
        for m, shapes in teacher_shapes.items():
            _check_logits(f"teacher {m!r}", shapes["logits"], dm.num_classes)
    context = {
        "num_samples": dm.num_train,
        "num_classes": dm.num_classes,
        "input_shape": tuple(dm.input_shape),
    }
    objective = build_objective(
        distill, student_shapes, teacher_shapes, teachers.weights if teachers else None, context
    )
    outputs = None
    if teachers is not None and objective.uses_teachers:  # a pre-stage-only term reads teachers live
        cache_spec = check_cache_cfg(cfg.get("teacher_cache"))
        if not teachers.unfitted:  # a dry run's unfitted teachers have no checkpoint to key a store by
            outputs = build_teacher_outputs(cache_spec, cfg, dm, teachers, distill, teacher_shapes)
    images = len(dm.input_shape) == 3
    apply_perf(perf, [student, *(teachers.members.values() if teachers is not None else [])], images)
    return DistillationModule(
        student,
        objective,
        teachers,
        student_taps,
        dm.num_classes,
        optim,
        teacher_outputs=outputs,
        channels_last=perf.channels_last and images,
    )


def apply_perf(perf: PerfSpec, models: Iterable[nn.Module], images: bool) -> None:
    """`perf.channels_last` (image models: weights and inputs in NHWC) and `perf.compile` (torch.compile of
    every model's forward with `perf.compile_backend`; forward hooks, so taps, keep working). Applied after
    the dry batch that sized the adapters."""
    models = list(models)
    for m in models:
        if perf.channels_last and images:
            m.to(memory_format=torch.channels_last)
        if perf.compile:
            m.forward = torch.compile(m.forward, backend=perf.compile_backend)
    applied = [f"torch.compile ({perf.compile_backend})"] * perf.compile + ["channels_last"] * (
        perf.channels_last and images
    )
    if applied:
        log.info("perf: %s on the student and %d teacher(s)", " + ".join(applied), len(models) - 1)
    elif perf.channels_last:
        log.info("perf.channels_last is for image models; these inputs are not images, left as they are")


def check_cache_cfg(value: Any) -> CacheSpec:
    if isinstance(value, str):
        raise ConfigError(
            f"teacher_cache={value!r}: teacher_cache is a group of keys now; use teacher_cache.mode={value}"
        )
    return parse(CacheSpec, to_dict(value), "teacher_cache")


def build_teacher_outputs(
    spec: CacheSpec,
    cfg: DictConfig,
    dm: TensorDataModule,
    teachers: TeacherEnsemble,
    distill: Mapping[str, Any],
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
) -> TeacherOutputs | None:
    """One store per (teacher, tap the terms read); filled at the start of the fit, shared by every job that
    needs the same teacher's outputs on the same data (see kd_lightning.store)."""
    if spec.mode == "none":
        return None
    if dm.fresh_views:
        log.info(
            "teacher_cache.mode=%s is off: data.augment draws a new view of every sample each step, so teacher "
            "outputs cannot be reused; teachers run live on every batch (set data.augment.views=K for "
            "consistent teaching with K recorded views per sample, which the store can hold)",
            spec.mode,
        )
        return None
    out = Path(cfg.paths.output_dir)
    folder = (
        Path(spec.dir or Path(cfg.paths.cache_dir) / "teacher_outputs") / dm.name
        if spec.mode == "disk"
        else None
    )
    identity = data_key(to_dict(cfg.data), dm.content_fingerprint())
    precision = str(cfg.trainer.get("precision", "32"))
    k = spec.logits_topk
    stores: dict[str, dict[str, TapStore | TopKLogitsStore]] = {}
    for m in teachers.names:
        source = Path(teachers.checkpoints[m])
        digest = file_digest(source) if source.is_file() else model_digest(teachers.members[m])
        stores[m] = {}
        for tap in Objective.teacher_taps(distill):
            module = teachers.tap_module(m, tap)
            key = store_key(identity, dm.cache_slots, digest, tap, module, spec.dtype, precision)
            if k is None:
                stores[m][tap] = TapStore(key, shapes[m][tap], folder, label=f"{m}-{tap}")
                continue
            if module != "logits":
                raise ConfigError(
                    f"teacher_cache.logits_topk={k} keeps logits only, but a distill term reads teacher tap "
                    f"{tap!r} ({module}); set teacher_cache.logits_topk=null or keep only logit terms"
                )
            if k >= dm.num_classes:
                raise ConfigError(
                    f"teacher_cache.logits_topk={k} must be smaller than the class count ({dm.num_classes}); "
                    "or null to keep every logit"
                )
            stores[m][tap] = TopKLogitsStore(key, dm.num_classes, k, folder, label=f"{m}-{tap}")
    return TeacherOutputs(stores, scratch=out / ".kd" / "teacher_outputs")


def _check_logits(owner: str, shape: tuple[int, ...], num_classes: int) -> None:
    if shape != (num_classes,):
        raise ConfigError(
            f"{owner} outputs shape {shape} per sample but the dataset has {num_classes} classes"
        )
