"""Build the objects of one run from its config: datamodule, teachers, student and module.

Everything here runs before training, so configuration errors surface before the first step.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch import nn

from kd_lightning.data.base import TensorDataModule
from kd_lightning.data.fingerprint import data_key
from kd_lightning.errors import ConfigError, choices
from kd_lightning.fitting import fit_accelerator, fit_model
from kd_lightning.models import create_model
from kd_lightning.module import DistillationModule
from kd_lightning.objective import Objective, build_objective
from kd_lightning.optim import build_optim
from kd_lightning.pretrain import resolve_pretrained
from kd_lightning.specs import CacheSpec, FitSpec, PerfSpec, parse
from kd_lightning.store import TapStore, TopKLogitsStore, file_digest, model_digest, store_key
from kd_lightning.taps import FeatureTaps, stages
from kd_lightning.teacher_cache import TeacherOutputs
from kd_lightning.teachers import TeacherEnsemble, build_teachers

log = logging.getLogger(__name__)


def to_dict(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig | ListConfig) else cfg


def instantiate(cfg: Any, where: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with our own ConfigErrors unwrapped and other failures named by key."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise ConfigError(f"{where}: {e}".replace("\n", " ")) from None


# The datamodules of kd_lightning.data, under every name a config may give them.
def our_datamodules() -> dict[str, type[TensorDataModule]]:
    import kd_lightning.data as data

    out: dict[str, type[TensorDataModule]] = {}
    for name in data.__all__:
        cls = getattr(data, name)
        if isinstance(cls, type) and issubclass(cls, TensorDataModule) and cls is not TensorDataModule:
            out[f"kd_lightning.data.{name}"] = cls
            out[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return out


TRANSFORM_KEYS = ("train_transforms", "eval_transforms")


def datamodule_class(target: Any, allowed: Iterable[str] | None = None) -> type[TensorDataModule]:
    """The class `data._target_` names. `allowed=None` (kd-train: the user's own config): ours, or any
    TensorDataModule subclass. Otherwise (a run folder read back by kd-eval) only ours and the names in
    `allowed`, checked before anything is imported: a recorded config is data, never code."""
    if not isinstance(target, str) or not target:
        raise ConfigError("data._target_ is missing: pick a dataset with data=<name>")
    ours = our_datamodules()
    if target in ours:
        return ours[target]
    if allowed is not None and target not in set(allowed):
        names = sorted(n for n in ours if n.count(".") == 2)
        raise ConfigError(
            f"data._target_={target!r} is not one of kd_lightning's datamodules ({', '.join(names)}); a class "
            "of your own is used only when you name it on the command line (kd-eval --datamodule CLASS)"
        )
    try:
        cls = hydra.utils.get_class(target)
    except Exception as e:
        raise ConfigError(f"data._target_={target!r} cannot be imported: {e}".replace("\n", " ")) from None
    if not (isinstance(cls, type) and issubclass(cls, TensorDataModule)):
        raise ConfigError(
            f"data._target_={target!r} is not a TensorDataModule subclass (kd_lightning.data.TensorDataModule)"
        )
    return cls


def _nested_target(value: Any, where: str) -> str | None:
    """The key of the first `_target_` nested anywhere in `value`, or None."""
    if isinstance(value, Mapping):
        if "_target_" in value:
            return where
        for k, v in value.items():
            found = _nested_target(v, f"{where}.{k}")
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _nested_target(v, f"{where}[{i}]")
            if found:
                return found
    return None


def instantiate_datamodule(
    data_cfg: Mapping[str, Any], allowed: Iterable[str] | None = None
) -> TensorDataModule:
    """`data` as its datamodule. Unknown keys are a ConfigError listing the valid ones; the class comes from
    `datamodule_class` (see `allowed`); no value is instantiated: a `_target_` nested in a value is refused
    (Hydra's recursive instantiation would run it), and the transform lists are built by the datamodule from
    an allowlist of torchvision transforms (kd_lightning.data.vision.image_pipeline)."""
    data_cfg = dict(to_dict(data_cfg))
    data_cfg.pop("name", None)
    cls = datamodule_class(data_cfg.pop("_target_", None), allowed)
    valid = set()
    for klass in cls.__mro__:
        if klass is object or not hasattr(klass, "__init__"):
            continue
        valid |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "kwargs")}
        if klass is TensorDataModule:
            break
    unknown = sorted(set(data_cfg) - valid - {"_partial_", "_convert_", "_recursive_"})
    if unknown:
        raise ConfigError(
            f"data has unknown key(s) {unknown}; valid keys for {cls.__name__}: {choices(valid)}"
        )
    for key in ("_partial_", "_convert_", "_recursive_"):
        data_cfg.pop(key, None)
    for key, value in data_cfg.items():
        if key in TRANSFORM_KEYS:
            continue
        found = _nested_target(value, f"data.{key}")
        if found:
            raise ConfigError(
                f"{found} holds a _target_: data values are settings, never objects to build (only "
                f"data.train_transforms / data.eval_transforms name classes, from torchvision's transforms)"
            )
    try:
        return cls(**data_cfg)
    except TypeError as e:
        raise ConfigError(f"data ({cls.__name__}): {e}") from None


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


def expand_stage_terms(
    distill: Mapping[str, Any], student: nn.Module, teachers: TeacherEnsemble | None
) -> dict[str, Any]:
    """A term whose taps are `stages` becomes one term per stage, `<name>1` … `<name>K`, each with the
    term's weight: RepDistiller sums AT's and NST's per-stage losses and weighs the sum. K is the fewest
    stages among the student and the teachers (RepDistiller zips the two lists); a model that declares no
    stages has one, its last feature map (kd_lightning.taps.stages). A term whose taps are `all_stages`
    stays one term and reads the list [stem, stage1, …, stageK] (FSP's consecutive pairs). In a list of
    taps, `stage*` and `preact*` become stage1 … stageK and preact1 … preactK (ReviewKD, AB)."""
    terms = distill.get("terms") or {}

    def wildcard(tap: Any) -> bool:
        return (
            isinstance(tap, Sequence) and not isinstance(tap, str) and any(str(x).endswith("*") for x in tap)
        )

    staged = [
        n
        for n, t in terms.items()
        if isinstance(t, Mapping)
        and any(
            t.get(k) in ("stages", "all_stages") or wildcard(t.get(k)) for k in ("student_tap", "teacher_tap")
        )
    ]
    if not staged:
        return dict(distill)
    models = [student, *(teachers.members.values() if teachers is not None else [])]
    n_stages = min(len(stages(m)) for m in models)
    expanded: dict[str, Any] = {}
    for name, term in terms.items():
        if name not in staged:
            expanded[name] = term
            continue
        if any(wildcard(term.get(k)) for k in ("student_tap", "teacher_tap")):
            expanded[name] = {
                **term,
                **{
                    k: _expand_taps(term.get(k), k, name, n_stages)
                    for k in ("student_tap", "teacher_tap")
                    if term.get(k) is not None
                },
            }
            continue
        if term.get("student_tap") == "all_stages":  # one term reading [stem, stage1, …, stageK] (FSP)
            if (term.get("teacher_tap") or "all_stages") != "all_stages":
                raise ConfigError(
                    f"distill.terms.{name}: student_tap all_stages needs teacher_tap all_stages, got "
                    f"{term.get('teacher_tap')!r}"
                )
            taps = ["stem", *(f"stage{i}" for i in range(1, n_stages + 1))]
            expanded[name] = {**term, "student_tap": taps, "teacher_tap": taps}
            continue
        if (term.get("student_tap"), term.get("teacher_tap") or "stages") != ("stages", "stages"):
            raise ConfigError(
                f"distill.terms.{name}: student_tap and teacher_tap must both be 'stages' (one term per stage), "
                f"got {term.get('student_tap')!r} and {term.get('teacher_tap')!r}"
            )
        for i in range(1, n_stages + 1):
            expanded[f"{name}{i}"] = {**term, "student_tap": f"stage{i}", "teacher_tap": f"stage{i}"}
    return {**distill, "terms": expanded}


_WILDCARDS = ("stage*", "preact*")


def _expand_taps(taps: Any, key: str, name: str, k: int) -> list[str]:
    if isinstance(taps, str):
        raise ConfigError(
            f"distill.terms.{name}.{key}={taps!r}: the other tap is a list with stage* or preact*; make this one "
            "a list too"
        )
    out: list[str] = []
    for tap in map(str, taps):
        if tap.endswith("*"):
            if tap not in _WILDCARDS:
                raise ConfigError(
                    f"distill.terms.{name}.{key}: unknown wildcard {tap!r}; valid: {', '.join(_WILDCARDS)}"
                )
            out += [f"{tap[:-1]}{i}" for i in range(1, k + 1)]
        else:
            out.append(tap)
    return out


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
