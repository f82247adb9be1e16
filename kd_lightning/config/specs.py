"""Typed configuration: one dataclass per concept, parsed once at the start of a run.

`parse(Spec, mapping, "where")` checks a config mapping against the dataclass: unknown keys are a
ConfigError listing the valid ones, each value is converted and range-checked from its field's type
and metadata, and a missing key takes the field's default (stated here, once). Specs that accept free
keys (a loss's own options) name a field to collect them in `__extra__`.

Why not Hydra structured configs: our groups are plain YAML that users edit, several specs live deep
inside free-form mappings (`teachers.members.<name>`, `distill.terms.<name>`), and the messages must name
the exact key with its valid choices; a 150-line parser keeps both.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, get_args, get_origin

from kd_lightning.errors import ConfigError, as_float, as_int, choices
from kd_lightning.plain import Plain, as_plain, plain_map

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


# --- field helpers ------------------------------------------------------------------------------
# Any: a field helper returns what `dataclasses.field` returns, which the type checker reads as the field's
# own type (`lr: float = num(...)`); the defaults are of that type too.
def num(
    default: Any = dataclasses.MISSING,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> Any:
    """A number field with bounds."""
    meta = {"low": low, "high": high, "open_low": open_low, "open_high": open_high}
    return field(default=default, metadata=meta)


# Any: as `num`
def one_of(default: Any, *valid: str) -> Any:
    """A string field with a fixed set of choices."""
    return field(default=default, metadata={"choices": tuple(valid)})


# Any: as `num`
def seed_field(default: int = 0) -> Any:
    return num(default, 0, 2**32 - 1)


# Any: as `num` (and `dataclasses.field`'s own keyword arguments)
def mapping(**kw: Any) -> Any:
    return field(default_factory=dict, **kw)


# Any: as `mapping`
def items(**kw: Any) -> Any:
    return field(default_factory=list, **kw)


# --- the parser ---------------------------------------------------------------------------------
def parse(cls: type[T], value: object, where: str) -> T:
    """`value` (a mapping, or None for all defaults) as a `cls` instance; ConfigError names the key."""
    if isinstance(value, cls):
        return value
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping of settings, got {value!r}")
    hints = typing.get_type_hints(cls)
    specs = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in specs}
    extra_field = getattr(cls, "__extra__", None)
    unknown = sorted(str(k) for k in value if k not in names or k == extra_field)
    kwargs: dict[str, Any] = {}
    if unknown and extra_field is None:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; valid: {choices(names)}")
    if extra_field is not None:
        kwargs[extra_field] = {k: value[k] for k in unknown}
    for f in specs:
        if f.name == extra_field:
            continue
        if f.name in value:
            kwargs[f.name] = _convert(hints[f.name], value[f.name], f"{where}.{f.name}", f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{f.name} is required")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def _bound(meta: Mapping[str, object], name: str) -> float | None:
    """A number field's bound (`num(low=..., high=...)`)."""
    value = meta.get(name)
    return float(value) if isinstance(value, int | float) else None


def _choices(meta: Mapping[str, object]) -> tuple[str, ...]:
    """A string field's choices (`one_of`)."""
    value = meta.get("choices")
    return tuple(str(c) for c in value) if isinstance(value, tuple) else ()


def _convert(tp: object, value: object, key: str, meta: Mapping[str, object]) -> object:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _convert(rest[0], value, key, meta)
        for a in rest:  # e.g. str | Mapping: the first that accepts the value
            try:
                return _convert(a, value, key, meta)
            except ConfigError:
                continue
        kinds = [_kind(a, meta) for a in rest] + (["null"] if type(None) in args else [])
        raise ConfigError(f"{key} has an unexpected value {value!r}; valid: {' or '.join(kinds)}")
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return parse(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        lo, hi = _bound(meta, "low"), _bound(meta, "high")
        return as_int(key, value, None if lo is None else int(lo), None if hi is None else int(hi))
    if tp is float:
        return as_float(
            key,
            value,
            _bound(meta, "low"),
            _bound(meta, "high"),
            bool(meta.get("open_low", False)),
            bool(meta.get("open_high", False)),
        )
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        valid = _choices(meta)
        if valid and value not in valid:
            raise ConfigError(f"{key}={value!r}; valid: {', '.join(valid)}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_convert(inner, v, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if origin in (dict, Mapping) or tp in (dict, Mapping) or origin is typing.Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        inner = args[1] if len(args) == 2 else Any
        return {str(k): _convert(inner, v, f"{key}.{k}", {}) for k, v in value.items()}
    return value


def _kind(tp: object, meta: Mapping[str, object]) -> str:
    """How an error names what a field of type `tp` accepts."""
    if tp is bool:
        return "true or false"
    if tp is str and _choices(meta):
        return " or ".join(_choices(meta))
    return getattr(tp, "__name__", str(tp))


def flatten(plain: Mapping[str, Plain], skip: Iterable[str] = ()) -> dict[str, Plain]:
    """A nested config as `dotted.key: value` leaves (lists and empty mappings as their JSON text), leaving
    out the keys in `skip` and everything under them: what a tracker or a report compares across runs."""
    import json

    skip = tuple(skip)
    out: dict[str, Plain] = {}

    def walk(value: Plain, prefix: str) -> None:
        key = prefix[:-1]
        if key and any(key == s or key.startswith(s + ".") for s in skip):
            return
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(value, list | tuple | Mapping):
            out[key] = json.dumps(value, sort_keys=True, default=str)
        else:
            out[key] = value

    walk(plain, "")
    return out


def spec_dict(spec: DataclassInstance) -> dict[str, Plain]:
    """A spec as plain data (for cache keys, results and logs)."""
    name = type(spec).__name__
    return dict(plain_map(as_plain(dataclasses.asdict(spec), name), name))


# --- the specs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitSpec:
    """Supervised fit of a teacher or a source-task model: Adam (lr, weight_decay) with a cosine schedule,
    or `optim` and `scheduler` given as the run's `optim`/`scheduler` groups are (any torch class), e.g.
    RepDistiller's protocol for the CIFAR-100 teachers."""

    seed: int = seed_field()
    max_epochs: int = num(20, 1)
    lr: float = num(1e-3, 0.0, open_low=True)
    weight_decay: float = num(0.0, 0.0)
    optim: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None

    def check(self, where: str) -> None:
        if self.optim is None:
            if self.scheduler is not None:
                raise ConfigError(
                    f"{where}.scheduler needs {where}.optim (the default Adam fit has its cosine)"
                )
            return
        if (self.lr, self.weight_decay) != (1e-3, 0.0):
            raise ConfigError(
                f"{where}.lr and {where}.weight_decay set the default Adam fit; with {where}.optim given, "
                f"set them inside it ({where}.optim.lr, {where}.optim.weight_decay)"
            )
        from kd_lightning.config.optim import build_optim

        try:
            build_optim(self.optim, self.scheduler)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def identity(self) -> dict[str, Plain]:
        """What decides the fit, for cache keys (unset optim/scheduler left out: older keys stay valid)."""
        plain = spec_dict(self)
        return {k: v for k, v in plain.items() if v is not None or k not in ("optim", "scheduler")}


@dataclass(frozen=True)
class PretrainedSpec:
    """`pretrained:` as a mapping: a checkpoint, or a source task to pre-train on once (and cache)."""

    checkpoint: str | None = None
    fit_if_missing: bool = False
    data: dict[str, Any] | None = None  # the source task's data config (with _target_)
    fit: FitSpec = field(default_factory=FitSpec)


@dataclass(frozen=True)
class AugmentSpec:
    """`data.augment`: random crop (zero padding) and horizontal flip, for images; `views` for consistent
    teaching (K recorded views per sample instead of a fresh one each step); `replay`, how recorded views of
    image files are made: image by image in the loader's workers (`per_sample`), or a whole batch at once on
    the training device (`batched`: kd_lightning.data.views.replay_crops)."""

    crop_padding: int = num(0, 0)
    hflip: bool = False
    views: int | None = num(None, 1)
    replay: str = one_of("per_sample", "per_sample", "batched")


@dataclass(frozen=True)
class LoaderSpec:
    """The `data` keys every datamodule has (kd_lightning.data.base.TensorDataModule): batches, the validation
    split, subsets, normalisation, augmentation and loader workers. The datamodule checks them with this
    spec, and stage 0 checks the ones a config sets, before anything heavy is imported."""

    batch_size: int = num(128, 1)
    eval_batch_size: int | None = num(None, 1)
    # 0: no validation split, the whole training set trains (RepDistiller's and mdistiller's protocol)
    val_fraction: float = num(0.1, 0.0, 1.0, open_high=True)
    split_seed: int = seed_field()
    train_subset: int | None = num(None, 1)
    normalize: bool = True
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    num_workers: int = num(0, 0)
    # keep the splits on the training device and gather batches there (kd_lightning.data.device): true,
    # false, or auto (on a GPU when they take at most a quarter of its free memory; datasets held in memory)
    on_device: bool | str = "auto"
    # a task made of some classes only, relabelled 0..k-1 in the order given (transfer-learning pairs)
    class_subset: list[Any] | None = None

    def check(self, where: str) -> None:
        if self.on_device not in (True, False, "auto"):
            raise ConfigError(f"{where}.on_device must be true, false or auto, got {self.on_device!r}")
        c = self.class_subset
        if c is None:
            return
        if len(c) < 2:
            raise ConfigError(
                f"{where}.class_subset must be null or a list of at least 2 class ids, got {c!r}"
            )
        ids = [as_int(f"{where}.class_subset entries", v, 0) for v in c]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{where}.class_subset has repeated ids: {ids}")


LABEL_LOSSES = ("ce", "mse")


@dataclass(frozen=True)
class DistillSpec:
    """`distill`: the label loss and its weight, the optional ρ mixture, and the terms (TermSpec each)."""

    ce_weight: float = num(1.0, 0.0)
    rho: float | None = num(None, 0.0, 1.0)
    label_loss: str = one_of("ce", *LABEL_LOSSES)
    terms: dict[str, TermSpec] = mapping()  # the active terms (kd_lightning.config.run_spec.parse_distill)


@dataclass(frozen=True)
class MemberSpec:
    """One teacher of `teachers.members`."""

    # null: read from the checkpoint when it is a self-describing kd_lightning model file (student.pt)
    arch: dict[str, Any] | None = None
    checkpoint: str | None = None
    taps: dict[str, str] = mapping()
    weight: float = num(1.0, 0.0)
    fit_if_missing: bool = False
    fit: FitSpec = field(default_factory=FitSpec)
    # a control: the architecture with fresh random weights (seeded by fit.seed), never trained
    random_weights: bool = False

    def check(self, where: str) -> None:
        if self.random_weights and (self.checkpoint or self.arch is None):
            raise ConfigError(
                f"{where}.random_weights=true builds {where}.arch with fresh weights: it needs arch and no checkpoint"
            )
        if self.arch is None:
            if not self.checkpoint:
                raise ConfigError(
                    f"{where}.arch is required when {where}.checkpoint is null (a model to fit: "
                    "arch: {name: <model>, ...})"
                )
        elif not isinstance(self.arch.get("name"), str) or not self.arch.get("name"):
            raise ConfigError(f"{where}.arch.name is required (a model name)")


COMBINE_MODES = ("per_teacher", "mean", "concat", "gate")


@dataclass(frozen=True)
class TermSpec:
    """One distillation term; keys it does not know are the distance's own options (`options`)."""

    __extra__ = "options"
    weight: float = num(1.0, 0.0)
    student_tap: str | list[str] = "embed"  # a list: methods that read several maps at once (fsp)
    teacher_tap: str | list[str] | None = None  # default: the student's tap (resolved in `tap`)
    distance: str = "mse"
    adapter: str = "auto"
    combine: str = one_of("per_teacher", *COMBINE_MODES)
    options: dict[str, Any] = mapping()

    @property
    def tap(self) -> str | list[str]:
        """The teacher tap this term reads."""
        return self.teacher_tap if self.teacher_tap is not None else self.student_tap


@dataclass(frozen=True)
class TargetSpec:
    """A group that names what to build (`_target_`: a class or function, checked where it is built) and its
    arguments (`options`, passed on as they are): optim, scheduler, each callback and logger."""

    __extra__ = "options"
    _target_: str | None = None
    options: dict[str, Any] = mapping()

    @property
    def config(self) -> dict[str, Plain]:
        """The mapping the builders read, as the config gave it."""
        return ({"_target_": self._target_} if self._target_ is not None else {}) | dict(self.options)


def targets(value: Plain, where: str) -> dict[str, TargetSpec | None]:
    """`callbacks` or `logger`: each entry a TargetSpec, or None (an entry switched off with `<name>=null`)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping of named entries, got {value!r}")
    return {str(k): None if v is None else parse(TargetSpec, v, f"{where}.{k}") for k, v in value.items()}


@dataclass(frozen=True)
class StudentSpec:
    """`student.*`: the architecture's name, the taps' aliases, and every other key the model's builder takes
    (`options`: width, weights, source, small_input, pretrained, ...), passed to it as they are."""

    __extra__ = "options"
    name: str | None = None  # every student group sets it; a runner of its own may need no student
    taps: dict[str, str] = mapping()
    options: dict[str, Any] = mapping()

    @property
    def arch(self) -> dict[str, Plain]:
        """The mapping the model builders read (kd_lightning.models.create_model), as the config gave it."""
        return ({"name": self.name} if self.name is not None else {}) | {
            "taps": dict(self.taps),
            **self.options,
        }


@dataclass(frozen=True)
class EvalSpec:
    """`evaluate.*`: metrics beyond accuracy and robustness under corrupted inputs."""

    metrics: bool = False
    corruptions: list[str] = items()
    severities: list[int] = items()
    seed: int = seed_field()

    @property
    def active(self) -> bool:
        return self.metrics or bool(self.corruptions)


@dataclass(frozen=True)
class PerfSpec:
    """`perf.*`: torch.compile of every model's forward (its backend and mode), the channels-last memory
    format, and a check that no training step reads a value on the host (kd_lightning.engine.sync_check)."""

    compile: bool | str = one_of("auto", "auto")  # auto: on a CUDA device with CUDA graphs, else off
    compile_backend: str = "inductor"
    compile_mode: str | None = one_of(
        None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    )
    channels_last: bool = False
    check_syncs: bool = False

    def on(self, cuda: bool) -> PerfSpec:
        """With `compile: auto` resolved for a run on a CUDA device (`cuda`) or not: on a GPU every model's
        forward compiled with CUDA graphs (reduce-overhead, unless compile_mode says otherwise), measured in
        docs/GPU_CHECK.md at about twice the eager step; on the CPU nothing compiled (compiling there takes
        longer than most CPU runs, and there are no launches to save)."""
        if self.compile != "auto":
            return self
        if not cuda:
            return dataclasses.replace(self, compile=False)
        return dataclasses.replace(self, compile=True, compile_mode=self.compile_mode or AUTO_COMPILE_MODE)

    def check(self, where: str) -> None:
        if self.compile_mode is not None and self.compile_backend != "inductor":
            raise ConfigError(
                f"{where}.compile_mode={self.compile_mode} is a mode of the inductor backend, but "
                f"{where}.compile_backend={self.compile_backend}: set {where}.compile_backend=inductor or "
                f"{where}.compile_mode=null"
            )


AUTO_COMPILE_MODE = "reduce-overhead"

CACHE_MODES = ("none", "memory", "disk")


STORE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class CacheSpec:
    """`teacher_cache.*`: where the teachers' outputs on the training set are kept (kd_lightning.store)."""

    mode: str = one_of("memory", *CACHE_MODES)
    dir: str | None = None  # disk stores; None: <paths.cache_dir>/teacher_outputs
    dtype: str = one_of("float32", *STORE_DTYPES)
    # keep the K largest logits per sample (+ their classes); null: every logit; auto: the top AUTO_TOPK for
    # recorded views of data with more than AUTO_TOPK_CLASSES classes (ImageNet), as FKD keeps its top-k
    logits_topk: int | str | None = "auto"

    def check(self, where: str) -> None:
        k = self.logits_topk
        if (isinstance(k, str) and k != "auto") or (isinstance(k, int) and k < 1):
            raise ConfigError(
                f"{where}.logits_topk={self.logits_topk!r}; valid: auto, null (every logit) or a number K >= 1"
            )


AUTO_TOPK, AUTO_TOPK_CLASSES = 10, 100  # our choice: FKD and ReLabel keep the top few soft labels too


@dataclass(frozen=True)
class MultiTaskTeacherSpec:
    tasks: list[str]
    channels: list[int] = field(default_factory=list, metadata={"low": 1})
    kernel_size: int = num(5, 1)
    fit: FitSpec = field(default_factory=FitSpec)


@dataclass(frozen=True)
class AmalgamationStudentSpec:
    channels: list[int] = field(default_factory=list, metadata={"low": 1})
    kernel_size: int = num(5, 1)


@dataclass(frozen=True)
class AmalgamationSpec:
    """`amalgamation.*` (runner=amalgamation, Ye et al. 2019)."""

    tasks: list[str]
    teachers: dict[str, MultiTaskTeacherSpec]
    student: AmalgamationStudentSpec = field(default_factory=AmalgamationStudentSpec)
    block_epochs: int = num(10, 0)
    head_epochs: int = num(10, 0)
    finetune_epochs: int = num(0, 0)
    fit_seed: int = num(0, 0)
    temperature: float = num(4.0, 0.0, open_low=True)
    lr: float = num(3e-3, 0.0, open_low=True)
    filter: str = one_of("taylor", "taylor", "none")
    block_stage: str = one_of("projection", "projection", "entangled")
