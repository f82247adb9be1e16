"""Build the objects of one run from its RunSpec: datamodule, teachers, student and module.

Everything here runs before training, so configuration errors surface before the first step.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from kd_lightning.config.optim import build_optim
from kd_lightning.config.run_spec import RunSpec
from kd_lightning.config.specs import FitSpec, PerfSpec, StudentSpec, parse
from kd_lightning.core.module import DistillationModule
from kd_lightning.core.objective import DataContext, Objective, build_objective
from kd_lightning.core.stage_terms import expand_stage_terms
from kd_lightning.data.base import TensorDataModule
from kd_lightning.data.from_config import instantiate_datamodule
from kd_lightning.engine.fitting import fit_model
from kd_lightning.engine.pretrain import resolve_pretrained
from kd_lightning.errors import ConfigError
from kd_lightning.models import create_model
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.plain import Plain
from kd_lightning.teachers.ensemble import TeacherEnsemble
from kd_lightning.teachers.feed import TeacherFeed
from kd_lightning.teachers.members import build_teachers
from kd_lightning.teachers.outputs import build_outputs

log = logging.getLogger(__name__)


@torch.no_grad()
def probe_shapes(model_taps: FeatureTaps, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of every tap, from one dry batch run in eval mode (no BN statistics updated)."""
    model = model_taps.model
    was_training = model.training
    model.eval()
    feats = model_taps(x)
    model.train(was_training)
    return {k: tuple(v.shape[1:]) for k, v in feats.items()}


def dry_batch(dm: TensorDataModule) -> torch.Tensor:
    """Up to 8 training inputs, prepared as the teachers see them: what the shapes are probed on."""
    batch = dm.prepare_batch(next(dm.iter_split("train", batch_size=8)), train=False)
    return batch.x[: min(8, len(batch.x))]


def teacher_tap_shapes(teachers: TeacherEnsemble, x: torch.Tensor) -> dict[str, dict[str, tuple[int, ...]]]:
    """Each member's per-sample shape of every tap it records, from the dry batch `x`."""
    return {m: {k: tuple(v.shape[1:]) for k, v in f.items()} for m, f in teachers(x).items()}


def build_datamodule(spec: RunSpec, allowed: Iterable[str] | None = None) -> TensorDataModule:
    """Stage 1's datamodule: `data` with the run's shuffle seed and per-epoch test (nothing set afterwards)."""
    return instantiate_datamodule(
        spec.data.config,
        allowed=allowed,
        shuffle_seed=spec.seed,
        test_each_epoch=spec.settings.test_each_epoch,
    )


def resolve_pretrained_models(spec: RunSpec) -> RunSpec:
    """The spec with every `pretrained:` mapping (student and teacher members) turned into a checkpoint path,
    pre-training on the source task first where the file is missing."""
    accelerator = spec.trainer.fit_accelerator

    def fit(arch: Mapping[str, Plain], data_cfg: Mapping[str, Plain], fit_spec: FitSpec, path: Path) -> None:
        source = instantiate_datamodule(data_cfg)
        source.setup("fit")
        _, acc = fit_model(
            dict(arch), source, fit_spec, accelerator, out_path=path, meta={"source": source.name}
        )
        log.info(
            "pre-trained %s on %s: source test acc %.4f → %s", arch.get("name"), source.describe(), acc, path
        )

    def content_of(data_cfg: Mapping[str, Plain]) -> str | None:
        return instantiate_datamodule(data_cfg).content_fingerprint()

    def resolved(owner: str, arch: dict[str, Plain]) -> dict[str, Plain]:
        if not isinstance(arch.get("pretrained"), Mapping | str):
            return arch
        new = resolve_pretrained(owner, arch, spec.paths.cache_dir, fit, content_of)
        out = {**arch, "pretrained": new["pretrained"]}
        if new.get("weights"):  # a torchvision weights name given as `pretrained`
            out["weights"] = new["weights"]
        return out

    record = copy.deepcopy(spec.resolved)  # what config.resolved.yaml says: the files the recipes made
    members = {}
    for name, member in spec.teachers.members.items():
        arch = dict(member.arch) if member.arch is not None else None
        if arch is not None and arch.get("pretrained") is not None:
            arch = resolved(f"teachers.members.{name}.arch", arch)
            record["teachers"]["members"][name]["arch"] = dict(arch)
        members[name] = replace(member, arch=arch)
    student = resolved("student", spec.student.arch)
    if student != spec.student.arch:
        record["student"] = dict(student)
    return replace(
        spec,
        student=parse(StudentSpec, student, "student"),
        teachers=replace(spec.teachers, members=members),
        resolved=record,
    )


def build_teacher_ensemble(spec: RunSpec, dm: TensorDataModule) -> TeacherEnsemble | None:
    """The run's frozen teachers, fitting the members that are not fitted yet (on this data, cached)."""
    accelerator = spec.trainer.fit_accelerator

    def fit(name: str, arch: Mapping[str, Plain], fit_spec: FitSpec, path: Path) -> None:
        _, acc = fit_model(dict(arch), dm, fit_spec, accelerator, out_path=path, meta={"teacher": name})
        log.info("fitted teacher %s: test acc %.4f → %s", name, acc, path)

    return build_teachers(
        spec.teachers,
        dm.num_classes,
        dm.input_shape,
        dm.name,
        spec.data.config,
        spec.paths.cache_dir,
        fit,
        dry_run=spec.settings.dry_run,
        content=dm.content_fingerprint(),
    )


def build_module(spec: RunSpec, dm: TensorDataModule, teachers: TeacherEnsemble | None) -> DistillationModule:
    """Student + objective sized on one dry batch (adapters get their shapes here, before training), the
    optimiser and schedule, the teacher feed (stored outputs or live teachers) and the perf switches."""
    distill = spec.distill
    if spec.teachers.no_teacher_point:
        log.info("teachers.use=[]: no teacher, the student learns from its labels alone (CE, weight 1)")
    optim = build_optim(spec.optim.config, spec.scheduler.config if spec.scheduler is not None else None)
    student = create_model(spec.student.arch, dm.num_classes, dm.input_shape)
    distill = expand_stage_terms(distill, student, teachers)
    student_taps = FeatureTaps(
        student,
        Objective.student_taps(distill),
        aliases=dict(spec.student.taps),
        owner="student",
    )
    x = dry_batch(dm)
    student_shapes = probe_shapes(student_taps, x)
    _check_logits("student", student_shapes["logits"], dm.num_classes)
    teacher_shapes = None
    if teachers is not None:
        teachers.configure_taps(Objective.teacher_taps(distill))
        teacher_shapes = teacher_tap_shapes(teachers, x)
        for m, shapes in teacher_shapes.items():
            _check_logits(f"teacher {m!r}", shapes["logits"], dm.num_classes)
    context: DataContext = {
        "num_samples": dm.num_train,
        "num_classes": dm.num_classes,
        "input_shape": tuple(dm.input_shape),
    }
    objective = build_objective(
        distill, student_shapes, teacher_shapes, teachers.weights if teachers else None, context
    )
    feed = None
    if teachers is not None:
        assert teacher_shapes is not None
        feed = _teacher_feed(spec, dm, teachers, objective, Objective.teacher_taps(distill), teacher_shapes)
    images = len(dm.input_shape) == 3
    perf = spec.perf.on(cuda=on_cuda(spec.trainer.options))
    apply_perf(perf, [student, *(teachers.members.values() if teachers is not None else [])], images)
    return DistillationModule(
        student,
        objective,
        feed,
        student_taps,
        dm.num_classes,
        optim,
        channels_last=spec.perf.channels_last and images,
    )


def _teacher_feed(
    spec: RunSpec,
    dm: TensorDataModule,
    teachers: TeacherEnsemble,
    objective: Objective,
    taps: list[str],
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
) -> TeacherFeed:
    """What the steps read of the teachers: their stored outputs where the rules allow a store
    (kd_lightning.teachers.outputs.build_outputs), else the teachers live."""
    outputs = None
    if objective.uses_teachers:  # a pre-stage-only term reads the teachers live
        scratch = Path(spec.paths.output_dir) / ".kd" / "teacher_outputs"
        outputs = build_outputs(
            spec.cache, dm, teachers, taps, shapes, spec.data.config, spec.trainer.precision, scratch=scratch
        )
    return TeacherFeed(teachers, outputs)


def on_cuda(trainer: Mapping[str, Plain]) -> bool:
    """Whether the Trainer these options make trains on a CUDA device."""
    accelerator = str(trainer.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def apply_perf(perf: PerfSpec, models: Iterable[nn.Module], images: bool) -> None:
    """`perf.channels_last` (image models: weights and inputs in NHWC) and `perf.compile` (torch.compile of
    every model's forward with `perf.compile_backend`; forward hooks, so taps, keep working). Applied after
    the dry batch that sized the adapters."""
    models = list(models)
    if perf.compile:
        # compiled code of an earlier run in this process (the jobs of a sweep run one after another) would
        # be reused for these models without their taps' forward hooks: torch does not guard on hooks
        torch._dynamo.reset()
    for m in models:
        if perf.channels_last and images:
            m.to(memory_format=torch.channels_last)
        if perf.compile:
            m.forward = _compiled(m, perf)
    how = perf.compile_backend + (f", {perf.compile_mode}" if perf.compile_mode else "")
    applied = [f"torch.compile ({how})"] * bool(perf.compile) + ["channels_last"] * (
        perf.channels_last and images
    )
    if applied:
        log.info("perf: %s on the student and %d teacher(s)", " + ".join(applied), len(models) - 1)
    elif perf.channels_last:
        log.info("perf.channels_last is for image models; these inputs are not images, left as they are")


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the inductor modes that capture CUDA graphs


# Any: the forward of any model, with its own arguments and outputs
def _compiled(m: nn.Module, perf: PerfSpec) -> Callable[..., Any]:
    """torch.compile of `m.forward`. Under CUDA graphs a replay writes its outputs into the memory of the
    previous replay, and a step keeps one model's outputs while another compiled model runs (the student's
    logits while the teacher runs, at test the student's beside the ensemble's): the outputs, and the
    features that FeatureTaps records (`kd_cuda_graphs`), are copied out of the graph's memory (one small
    copy each), as torch's error message for this case advises."""
    compiled = torch.compile(m.forward, backend=perf.compile_backend, mode=perf.compile_mode)
    if perf.compile_mode not in CUDA_GRAPH_MODES:
        return compiled
    m.__dict__["kd_cuda_graphs"] = True  # read by FeatureTaps (a plain flag: nn.Module would store it so too)

    # Any: as `_compiled`
    @functools.wraps(m.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return tree_map_only(torch.Tensor, torch.clone, compiled(*args, **kwargs))

    return forward


def _check_logits(owner: str, shape: tuple[int, ...], num_classes: int) -> None:
    if shape != (num_classes,):
        raise ConfigError(
            f"{owner} outputs shape {shape} per sample but the dataset has {num_classes} classes"
        )


def build_shared_feed(
    spec: RunSpec, dm: TensorDataModule, teachers: TeacherEnsemble, taps: list[str], scratch: Path
) -> TeacherFeed:
    """One feed of `teachers` (their `taps`) for several jobs that train together (kd_lightning.core.packed):
    stored where the run's teacher_cache says, as a run's own feed is; `scratch`: where stores shared
    between ranks would go."""
    teachers.configure_taps(taps)
    shapes = teacher_tap_shapes(teachers, dry_batch(dm))
    outputs = build_outputs(
        spec.cache, dm, teachers, taps, shapes, spec.data.config, spec.trainer.precision, scratch=scratch
    )
    return TeacherFeed(teachers, outputs)
