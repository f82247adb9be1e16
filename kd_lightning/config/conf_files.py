"""Where the configs are, and the checks that run before Hydra takes over.

- `CONF_DIR`: the configs a wheel carries (`kd_lightning/conf`, package data), else the checkout's `conf/`
  (editable installs and `python -m` from the source tree). `conf/` at the top of the repository is the
  one place users read and edit; the build copies it into the package.
- `check_config_dirs`: Hydra/OmegaConf report a file that is not valid YAML, or that holds a scalar
  instead of a mapping, without naming the file; this names it, with the line.
- `check_composition`: composes the command line's first job, so that an unknown group option, an
  override of a key that does not exist or bad override syntax ends as a ConfigError (exit code 2).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from kd_lightning.config.hydra import to_mapping
from kd_lightning.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig


def _find_conf_dir() -> Path:
    package = Path(__file__).resolve().parents[1]  # kd_lightning/
    packaged = package / "conf"
    if (packaged / "train.yaml").is_file():
        return packaged
    return package.parent / "conf"


CONF_DIR = _find_conf_dir()


def check_config_file(path: Path) -> None:
    """Raise ConfigError if `path` is not YAML holding a mapping (an empty file is allowed)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if obj is not None and not isinstance(obj, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of `key: value` lines, got a {type(obj).__name__} ({obj!r:.60})"
        )


def check_config_dirs(dirs: Iterable[str | Path]) -> None:
    """Check every *.yaml / *.yml file under each existing directory."""
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            continue
        for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
            check_config_file(path)


def config_dirs_from_argv(argv: list[str], default: Path) -> list[Path]:
    """The packaged conf dir plus any `--config-dir/-cd DIR` or `--config-path/-cp DIR` a user passes."""
    dirs = [default]
    for i, arg in enumerate(argv):
        for flag in ("--config-dir", "-cd", "--config-path", "-cp"):
            if arg == flag and i + 1 < len(argv):
                dirs.append(Path(argv[i + 1]))
            elif arg.startswith(flag + "="):
                dirs.append(Path(arg.split("=", 1)[1]))
    return dirs


def _first_job(overrides: list[str]) -> list[str] | None:
    """The overrides of a multirun's first job (each sweep replaced by its first value); None when a sweep
    cannot be listed (a sweeper's interval): the check is then left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    first: list[str] = []
    for o in parsed:
        if not o.is_sweep_override():
            if o.input_line is None:
                return None
            first.append(o.input_line)
            continue
        try:
            value = next(iter(o.sweep_string_iterator()))
        except Exception:
            return None
        first.append(f"{o.get_key_element()}={value}")
    return first


def _other_choices(argv: list[str], first: list[str], conf_dir: Path) -> list[list[str]]:
    """The first job's overrides with each further value of a config group that the sweep lists
    (`distill=kd,kdd`): a misspelt choice is found now, not by Hydra after the first jobs have run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(argv):
        key = o.get_key_element()
        if not o.is_sweep_override() or not (conf_dir / key.lstrip("+~")).is_dir():
            continue
        try:
            values = list(o.sweep_string_iterator())
        except Exception:
            continue
        position = next(i for i, f in enumerate(first) if f.split("=", 1)[0] == key)
        for value in values[1:]:
            out.append([*first[:position], f"{key}={value}", *first[position + 1 :]])
    return out


def check_launcher(argv: list[str], conf_dir: Path) -> None:
    """A sweep sent to SLURM (`-m hydra/launcher=slurm`, submitit): the tasks each job gets must be the
    processes its Trainer expects, checked now rather than inside every job after it waited in the queue:
    `hydra.launcher.tasks_per_node` against `trainer.devices`, and `hydra.launcher.nodes` against
    `trainer.num_nodes` (trainer=multinode reads the node count from SLURM itself)."""
    from hydra import compose, initialize_config_dir

    multirun = "-m" in argv or "--multirun" in argv
    submitit = [a for a in argv if a.startswith("hydra/launcher=") and ("slurm" in a or "submitit" in a)]
    if not multirun or not submitit:
        return
    overrides = _first_job([a for a in argv if a not in ("-m", "--multirun")])
    if overrides is None:
        return
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher, trainer = cfg.hydra.launcher, cfg.trainer
    if submitit[-1].endswith("submitit_local"):
        if int(launcher.get("tasks_per_node") or 1) > 1:
            raise ConfigError(
                f"hydra.launcher.tasks_per_node={launcher.get('tasks_per_node')}: hydra/launcher=submitit_local "
                "runs each task as a separate copy of the job, not as DDP ranks (they would collide in one "
                "folder). Keep tasks_per_node=1 and use trainer=ddp_cpu trainer.devices=N (or trainer=ddp) for "
                "several processes; to preview a SLURM sweep's settings: kd-train <overrides> --cfg hydra -p "
                "hydra.launcher hydra/launcher=slurm"
            )
        return
    raw = to_mapping(trainer, "trainer", resolve=False)
    tasks, nodes = launcher.get("tasks_per_node"), launcher.get("nodes")
    devices = str(trainer.get("devices"))
    if tasks is not None and devices.isdigit() and int(devices) != int(tasks):
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={tasks} starts {tasks} processes per node, but trainer.devices="
            f"{devices}: Lightning would stop every job in the queue. Set trainer.devices={tasks} (one process "
            "per GPU), or hydra.launcher.tasks_per_node to trainer.devices"
        )
    gpus, on_gpu = launcher.get("gpus_per_node"), str(trainer.get("accelerator")) in ("gpu", "cuda", "auto")
    if tasks is not None and gpus is not None and on_gpu and 0 < int(gpus) < int(tasks):
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={tasks} but hydra.launcher.gpus_per_node={gpus}: each task trains "
            f"on a GPU of its own; set hydra.launcher.gpus_per_node={tasks}"
        )
    from_env = "kd_num_nodes" in str(raw.get("num_nodes", ""))
    if nodes is not None and not from_env and int(trainer.get("num_nodes", 1)) != int(nodes):
        raise ConfigError(
            f"hydra.launcher.nodes={nodes} but trainer.num_nodes={trainer.get('num_nodes', 1)}: use "
            f"trainer=multinode (it reads the node count from SLURM) or trainer.num_nodes={nodes}"
        )


def launcher_argv(argv: list[str]) -> list[str]:
    """Extra overrides for the chosen launcher: submitit's local executor creates its folder literally, so
    its default `.submitit/%j` (a SLURM job-id pattern) would leave a folder named `%j`."""
    local = any(a == "hydra/launcher=submitit_local" for a in argv)
    if not local or any(a.startswith("hydra.launcher.submitit_folder=") for a in argv):
        return []
    return ["hydra.launcher.submitit_folder=${hydra.sweep.dir}/.submitit"]


def check_composition(
    argv: list[str], conf_dir: Path, options_of: Callable[[str], list[str]] | None = None
) -> DictConfig | None:
    """Compose the first job of `kd-train ARGV` with Hydra's compose API; raise ConfigError if it fails.
    Returns the composed config (None when the check is left to Hydra)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return None  # Hydra prints its own usage message
    if args.config_path or args.config_dir or args.config_name or args.help or args.hydra_help:
        return None  # another config tree (DDP children, user folders): Hydra reports on it
    try:
        overrides = _first_job(list(args.overrides))
        if overrides is None:
            return None
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
            for other in _other_choices(list(args.overrides), overrides, conf_dir):
                compose("train", overrides=other)  # a sweep's later group choices exist too
            return cfg
    except (HydraException, OmegaConfBaseException) as e:
        text = str(e).split("Config search path")[0]  # Hydra's own message, without the search path
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        message = " ".join(lines[:2]) + (" " + ", ".join(lines[2:]) if lines[2:] else "")
        misspelt = re.match(r"Could not override '([^']+)'", message)
        if misspelt:
            raise ConfigError(
                _unknown_key(misspelt.group(1), overrides or [], conf_dir, options_of)
            ) from None
        raise ConfigError(message + _torchvision_hint(message)) from None


def _unknown_key(
    key: str, overrides: list[str], conf_dir: Path, options_of: Callable[[str], list[str]] | None
) -> str:
    """`x.y.z` is not a key: the message lists the keys `x.y` has (for a distill term, also its distance's
    options: `options_of(distance)`, the command's, which knows the losses), and how to add a key on purpose."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    parent, _, leaf = key.rpartition(".")
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key), "...")
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose("train", overrides=rest)
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except Exception:
        node = None
    if node is None or not OmegaConf.is_dict(node):
        return f"{key} is not a key of the config; to add it on purpose: +{key}={value}"
    valid = sorted(str(k) for k in node)
    extra = ""
    term = re.fullmatch(r"distill\.terms\.[^.]+", parent)
    if term and isinstance(node.get("distance"), str) and options_of is not None:
        options = options_of(str(node.get("distance")))
        valid = sorted(set(valid) - set(options))
        if options:
            extra = f"; the options of distance {node.get('distance')!r}: {', '.join(options)}"
    return (
        f"{leaf!r} is not a key of {parent or 'the config'} ({key}); valid keys: {', '.join(valid)}{extra}. "
        f"To add a key on purpose: +{key}={value}"
    )


# torchvision's classification models (`torchvision.models.list_models()` of the pinned torchvision==0.29.1;
# tests/test_config_files.py checks the list against the installed one): the hint for `student=resnet18`
# must not import torchvision, which takes seconds, to answer a misspelt group
# fmt: off
TORCHVISION_MODELS = frozenset({
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny",
    "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet101", "deeplabv3_resnet50", "densenet121",
    "densenet161", "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
    "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_v2_s", "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
    "fcn_resnet101", "fcn_resnet50", "fcos_resnet50_fpn", "googlenet", "inception_v3",
    "keypointrcnn_resnet50_fpn", "lraspp_mobilenet_v3_large", "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2", "maxvit_t", "mc3_18", "mnasnet0_5", "mnasnet0_75", "mnasnet1_0",
    "mnasnet1_3", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "mvit_v1_b", "mvit_v2_s",
    "quantized_googlenet", "quantized_inception_v3", "quantized_mobilenet_v2",
    "quantized_mobilenet_v3_large", "quantized_resnet18", "quantized_resnet50",
    "quantized_resnext101_32x8d", "quantized_resnext101_64x4d", "quantized_shufflenet_v2_x0_5",
    "quantized_shufflenet_v2_x1_0", "quantized_shufflenet_v2_x1_5", "quantized_shufflenet_v2_x2_0",
    "r2plus1d_18", "r3d_18", "raft_large", "raft_small", "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf",
    "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf",
    "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf",
    "resnet101", "resnet152", "resnet18", "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d",
    "resnext50_32x4d", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "s3d", "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0", "squeezenet1_1",
    "ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "swin3d_b", "swin3d_s", "swin3d_t", "swin_b", "swin_s",
    "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16",
    "vgg16_bn", "vgg19", "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32",
    "wide_resnet101_2", "wide_resnet50_2"
})
# fmt: on


def _torchvision_hint(message: str) -> str:
    """`student=resnet18`: a torchvision architecture is chosen through student=torchvision."""
    import re

    found = re.search(r"Could not find 'student/([^']+)'", message)
    if not found:
        return ""
    name = found.group(1)
    if name not in TORCHVISION_MODELS:
        return ""
    return f". {name!r} is a torchvision model: student=torchvision student.name={name}"


def compose_run(
    overrides: Iterable[str],
    output_dir: Path | str,
    cache_dir: Path | str | None = None,
    cwd: Path | str | None = None,
) -> DictConfig:
    """The config that `kd-train OVERRIDES` would run, composed in this process with `output_dir` as its run
    folder (and `paths.cache_dir`, and the folder it starts from, `cwd`, when given), for
    `kd_lightning.runners.run.run(cfg)` from Python: the notebooks, the benchmarks and the tests."""
    import os

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from kd_lightning.config.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        if cache_dir is not None:
            cfg.paths.cache_dir = str(cache_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(cwd) if cwd is not None else os.getcwd()
    HydraConfig.instance().set_config(cfg)
    return cfg
