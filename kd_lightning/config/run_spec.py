"""Stage 0 of a run: the composed config, parsed once into one typed `RunSpec`.

Every builder after this stage takes the spec (or the part of it that it needs), never the raw config:
the data group (`DataSpec`), the teacher pool (`TeachersSpec`, each member a `MemberSpec`), the student's
model spec, the objective (`DistillSpec` with `terms: dict[str, TermSpec]`), the teacher-output store
(`CacheSpec`, its folder made explicit), `perf`, `evaluate`, the Trainer's arguments (`TrainerSpec`), the
optimiser and schedule (Hydra partials, built in kd_lightning.config.optim), callbacks and loggers, the
amalgamation block, the run folders and the top-level settings (`RunSettings`). `resolved` keeps the
whole config as plain data, for what a run writes and compares (config.resolved.yaml, resume=auto, the
configuration DDP children re-read).

Parsing resolves every interpolation and names the first value left unset; each spec checks its own keys
and values (kd_lightning.config.specs).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kd_lightning.config.hydra import to_mapping
from kd_lightning.config.resolvers import register_resolvers
from kd_lightning.config.specs import (
    CacheSpec,
    DistillSpec,
    EvalSpec,
    LoaderSpec,
    MemberSpec,
    PerfSpec,
    StudentSpec,
    TargetSpec,
    TermSpec,
    items,
    mapping,
    num,
    parse,
    seed_field,
    targets,
)
from kd_lightning.errors import ConfigError, as_int, choices, safe_name
from kd_lightning.plain import Plain

register_resolvers()  # the configs' ${kd_...} resolvers: resolving a config needs them


@dataclass(frozen=True)
class RunSettings:
    """The top-level keys of conf/train.yaml that no group owns."""

    seed: int = seed_field()
    runner: str = "distill"
    baseline: bool = False
    test_each_epoch: bool = False
    dry_run: bool = False
    print_summary: bool = True
    print_config: bool = False
    jobs_per_gpu: int = num(4, 1)  # hydra/launcher=gpu_pool (read by its n_jobs; the job reads its GPU)
    verbose: bool = False
    resume: str | None = None
    resume_accept: list[str] = items()
    overwrite: bool = False
    method_defaults: dict[str, Any] = mapping()

    def check(self, where: str) -> None:
        r = self.resume
        if r not in (None, "auto") and not Path(r).is_file():
            raise ConfigError(f"resume must be null, 'auto' or an existing checkpoint file, got {r!r}")


@dataclass(frozen=True)
class DataSpec:
    """`data`: the datamodule class and its arguments (the class checks them: kd_lightning.data.from_config)."""

    target: str | None
    options: dict[str, Any]

    @property
    def config(self) -> dict[str, Plain]:
        """The group as written (`_target_` and its keys), what cache keys are made from."""
        return {"_target_": self.target, **self.options} if self.target else dict(self.options)


@dataclass(frozen=True)
class TeachersSpec:
    """`teachers`: the pool (every member parsed), the subset a run uses and the fit-seed offset."""

    members: dict[str, MemberSpec]
    use: list[str] | None = None
    fit_seed: int = 0

    @property
    def selected(self) -> list[str]:
        return list(self.members) if self.use is None else list(self.use)

    @property
    def no_teacher_point(self) -> bool:
        """`teachers.use=[]` with a pool: the same job without any teacher (sweep_include_none)."""
        return self.use is not None and not self.use and bool(self.members)

    @property
    def label(self) -> str:
        """`cnn_a+cnn_b`, in the order `teachers.use` names them ("none" without any); a random-weights control
        is marked."""
        used = [n for n in self.selected if n in self.members]
        return "+".join(f"{n}(random)" if self.members[n].random_weights else n for n in used) or "none"


@dataclass(frozen=True)
class TrainerSpec:
    """`trainer`: the arguments of pl.Trainer (with its `_target_`), and the ones the run itself reads."""

    options: dict[str, Any]

    @property
    def accelerator(self) -> str:
        return str(self.options.get("accelerator", "auto")).lower()

    @property
    def precision(self) -> str:
        return str(self.options.get("precision", "32"))

    @property
    def max_epochs(self) -> int:
        return int(self.options["max_epochs"])

    @property
    def fit_accelerator(self) -> str:
        """Fits inside a run (teachers, source tasks, baseline) use the run's accelerator, on one device."""
        return str(self.options.get("accelerator", "cpu"))


# What pl.Trainer accepts for the arguments a config sets most (the others are Lightning's to check).
PRECISIONS = ("64", "64-true", "32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true",
              "transformer-engine", "transformer-engine-float16")  # fmt: skip
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")


def check_trainer(options: Mapping[str, Plain]) -> None:
    """trainer.devices, num_nodes, precision and accelerator, each named with its valid values before
    Lightning sees them (its own messages name neither the key nor the choices)."""
    devices = options.get("devices", "auto")
    ok = (
        (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1))
        or (
            isinstance(devices, str)
            and (devices == "auto" or re.fullmatch(r"-1|[1-9][0-9]*|[0-9]+(,[0-9]*)+", devices))
        )
        or (
            isinstance(devices, list | tuple)
            and devices
            and all(isinstance(d, int) and d >= 0 for d in devices)
        )
    )
    if not ok:
        raise ConfigError(
            f"trainer.devices={devices!r} is not valid; give a positive number of devices, -1 (every device), "
            "'auto', or a list of device indices such as [0, 1]"
        )
    nodes = options.get("num_nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"trainer.num_nodes={nodes!r} is not valid; give a positive number of nodes")
    precision = str(options.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not valid; valid: {', '.join(PRECISIONS)}")
    accelerator = options.get("accelerator", "auto")
    if isinstance(accelerator, str) and accelerator.lower() not in ACCELERATORS:
        raise ConfigError(
            f"trainer.accelerator={accelerator!r} is not valid; valid: {', '.join(ACCELERATORS)}"
        )


@dataclass(frozen=True)
class PathsSpec:
    output_dir: str
    cache_dir: str


@dataclass(frozen=True)
class RunSpec:
    settings: RunSettings
    data: DataSpec
    student: StudentSpec
    teachers: TeachersSpec
    distill: DistillSpec
    cache: CacheSpec
    perf: PerfSpec
    evaluation: EvalSpec
    trainer: TrainerSpec
    optim: TargetSpec
    scheduler: TargetSpec | None
    callbacks: dict[str, TargetSpec | None]
    logger: dict[str, TargetSpec | None]
    paths: PathsSpec
    resolved: dict[str, Any] = field(repr=False, compare=False)

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def distance_label(self) -> str:
        """The distances the terms use (`mse+kl`), "none" without teachers."""
        if self.teachers.no_teacher_point:
            return "none"
        return "+".join(sorted({t.distance for t in self.distill.terms.values()})) or "none"


def resolved_config(cfg: DictConfig | Mapping[str, Plain]) -> dict[str, Plain]:
    """The config without Hydra's node, every interpolation resolved; an unset value or an interpolation
    that does not resolve is a ConfigError naming the key. Plain data (a recorded config read back with
    yaml.safe_load) is taken as it is: nothing in it is resolved."""
    if not isinstance(cfg, DictConfig):
        return {str(k): v for k, v in cfg.items() if k != "hydra"}
    plain = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"])
    try:
        missing = sorted(OmegaConf.missing_keys(plain))
        if not missing:
            return to_mapping(plain)
    except OmegaConfBaseException as e:  # an interpolation that does not resolve
        raise ConfigError(f"{e.full_key}: {str(e).splitlines()[0]}") from None
    raise ConfigError(
        f"{missing[0]} must be set: it has no default (add {missing[0]}=<value> to the command line)"
        + (f"; also unset: {', '.join(missing[1:])}" if len(missing) > 1 else "")
    )


def nested_target(value: Plain, where: str) -> str | None:
    """The key of the first `_target_` nested anywhere in `value`, or None."""
    if isinstance(value, Mapping):
        if "_target_" in value:
            return where
        for k, v in value.items():
            found = nested_target(v, f"{where}.{k}")
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = nested_target(v, f"{where}[{i}]")
            if found:
                return found
    return None


TRANSFORM_KEYS = ("train_transforms", "eval_transforms")


def refuse_nested_targets(data: Mapping[str, Plain]) -> None:
    """A `_target_` nested in a data value is refused: data values are settings, never objects to build (a
    recorded config is data, never code). Only the transform lists name classes, from an allowlist."""
    for key, value in data.items():
        if key in TRANSFORM_KEYS or key == "_target_":
            continue
        found = nested_target(value, f"data.{key}")
        if found:
            raise ConfigError(
                f"{found} holds a _target_: data values are settings, never objects to build (only "
                f"data.train_transforms / data.eval_transforms name classes, from torchvision's transforms)"
            )


def _group(plain: Mapping[str, Plain], key: str) -> dict[str, Plain]:
    value = plain.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping of settings, got {value!r}")
    return dict(value)


def parse_teachers(value: Mapping[str, Plain] | None) -> TeachersSpec:
    value = dict(value or {})
    unknown = sorted(set(value) - {"members", "use", "fit_seed"})
    if unknown:
        raise ConfigError(f"teachers has unknown key(s) {unknown}; valid: fit_seed, members, use")
    pool = value.get("members") or {}
    if not isinstance(pool, Mapping):
        raise ConfigError(f"teachers.members must map teacher names to their settings, got {pool!r}")
    # a member's name becomes part of its cache files' names: it must be a plain name
    members = {
        safe_name(f"teachers.members.{n}: the teacher name", str(n)): parse(
            MemberSpec, m, f"teachers.members.{n}"
        )
        for n, m in pool.items()
    }
    given = value.get("use")
    use: list[str] | None = None
    if given is not None:
        listed = [given] if isinstance(given, str) else given
        if not isinstance(listed, list | tuple) or not all(isinstance(u, str) for u in listed):
            raise ConfigError(
                f"teachers.use must be null or a list of teacher names from {choices(members)}, got {given!r}"
            )
        use = [str(u) for u in listed]
        unknown = [u for u in use if u not in members]
        if unknown and members:
            raise ConfigError(
                f"teachers.use names unknown teacher(s) {unknown}; the pool has: {choices(members)}"
            )
    fit_seed = as_int("teachers.fit_seed", value.get("fit_seed") or 0, 0)
    return TeachersSpec(members, use, fit_seed)


def parse_distill(value: Mapping[str, Plain] | None, no_teacher: bool) -> DistillSpec:
    """`distill` with its active terms parsed (a term set to null is switched off); the no-teacher point of
    a subset sweep drops every term and gives the label loss weight 1."""
    value = dict(value or {})
    if no_teacher:
        value = {"ce_weight": 1.0, "terms": {}}
    terms = value.get("terms") or {}
    if not isinstance(terms, Mapping):
        raise ConfigError(
            f"distill.terms must be a mapping of term name → settings, got {type(terms).__name__}"
        )
    parsed: dict[str, TermSpec] = {}
    for name, spec in terms.items():
        if spec is None:
            continue
        term = parsed[str(name)] = parse(TermSpec, spec, f"distill.terms.{name}")
        for key, tap in (("student_tap", term.student_tap), ("teacher_tap", term.teacher_tap)):
            if isinstance(tap, list) and (not tap or not all(isinstance(x, str) and x for x in tap)):
                raise ConfigError(
                    f"distill.terms.{name}.{key}: a list of taps must name one or more taps, got {tap!r}"
                )
    return parse(DistillSpec, {**value, "terms": parsed}, "distill")


def as_distill(value: DistillSpec | Mapping[str, Plain] | None) -> DistillSpec:
    """A DistillSpec, or a `distill` mapping parsed into one (the objective's API takes either)."""
    return value if isinstance(value, DistillSpec) else parse_distill(value, no_teacher=False)


def parse_cache(value: Plain, cache_dir: str) -> CacheSpec:
    if isinstance(value, str):
        raise ConfigError(
            f"teacher_cache={value!r}: teacher_cache is a group of keys now; use teacher_cache.mode={value}"
        )
    spec = parse(CacheSpec, value, "teacher_cache")
    return dataclasses.replace(spec, dir=spec.dir or str(Path(cache_dir) / "teacher_outputs"))


def parse_run(cfg: DictConfig | Mapping[str, Plain]) -> RunSpec:
    """Stage 0: the composed config (or a recorded one, as plain data) as a RunSpec."""
    plain = resolved_config(cfg)
    names = {f.name for f in fields(RunSettings)}
    settings = parse(RunSettings, {k: plain[k] for k in names if k in plain}, "config")
    paths = _group(plain, "paths")
    output_dir, cache_dir = paths.get("output_dir"), paths.get("cache_dir")
    for key, folder in (("output_dir", output_dir), ("cache_dir", cache_dir)):
        if not isinstance(folder, str):
            raise ConfigError(f"paths.{key} must be a folder, got {folder!r}")
    assert isinstance(output_dir, str) and isinstance(cache_dir, str)  # checked just above
    data = _group(plain, "data")
    data.pop("name", None)
    target = data.pop("_target_", None)
    if target is not None and not isinstance(target, str):
        raise ConfigError(f"data._target_ must be a datamodule class path, got {target!r}")
    refuse_nested_targets(data)
    # the keys every datamodule has, checked here already: a bad batch size answers before torch is imported
    loader = {f.name for f in fields(LoaderSpec)}
    parse(LoaderSpec, {k: v for k, v in data.items() if k in loader}, "data")
    teachers = parse_teachers(_group(plain, "teachers"))
    trainer = _group(plain, "trainer")
    as_int("trainer.max_epochs", trainer.get("max_epochs"), 1)
    check_trainer(trainer)
    student = parse(StudentSpec, _group(plain, "student"), "student")
    return RunSpec(
        settings=settings,
        data=DataSpec(target, data),
        student=student,
        teachers=teachers,
        distill=parse_distill(_group(plain, "distill"), teachers.no_teacher_point),
        cache=parse_cache(plain.get("teacher_cache"), cache_dir),
        perf=parse(PerfSpec, plain.get("perf"), "perf"),
        evaluation=parse(EvalSpec, plain.get("evaluate"), "evaluate"),
        trainer=TrainerSpec(trainer),
        optim=parse(TargetSpec, _group(plain, "optim"), "optim"),
        scheduler=None
        if plain.get("scheduler") is None
        else parse(TargetSpec, plain["scheduler"], "scheduler"),
        callbacks=targets(plain.get("callbacks"), "callbacks"),
        logger=targets(plain.get("logger"), "logger"),
        paths=PathsSpec(output_dir, cache_dir),
        resolved=plain,
    )
