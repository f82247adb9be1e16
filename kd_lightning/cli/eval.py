"""kd-eval: metrics beyond accuracy and robustness curves for finished runs, from their folders.

    kd-eval RUN_DIR [RUN_DIR ...] [--corruptions gaussian_noise,blur] [--severities 0,1,2,3,4,5] [--out DIR]

Each run is rebuilt from what it wrote (config.resolved.yaml, student.pt, results.json's teacher files);
nothing is trained. A run folder is data, never code: see `load_run` for what is trusted. With several runs, their students are also drawn on one plot (OUT/robustness.png).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from kd_lightning.cli import config_error_exit
from kd_lightning.config.run_spec import RunSpec, TeachersSpec, parse_run
from kd_lightning.data.from_config import instantiate_datamodule
from kd_lightning.errors import ConfigError
from kd_lightning.evaluation.corruptions import CORRUPTIONS
from kd_lightning.evaluation.robustness import plot_robustness, read_rows, robustness_table
from kd_lightning.evaluation.run_eval import check_eval_cfg, evaluate_and_write
from kd_lightning.models import load_model
from kd_lightning.plain import Plain, plain_map, plain_str
from kd_lightning.runners.results import read_results
from kd_lightning.teachers.members import build_teachers

if TYPE_CHECKING:
    from torch import nn

    from kd_lightning.data.base import TensorDataModule
    from kd_lightning.teachers.ensemble import TeacherEnsemble

RESOLVED = "config.resolved.yaml"


def read_recorded_config(path: Path) -> dict[str, Plain]:
    """A run's config.resolved.yaml as plain data (yaml.safe_load: no tags, no interpolation, no objects)."""
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} cannot be read as a recorded config: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("data"), dict):
        raise ConfigError(f"{path} is not a kd-train config (no `data` mapping)")
    return cfg


def recorded_teachers(spec: RunSpec, used: dict[str, str]) -> TeachersSpec:
    """The members a run used, each pointed at the file the run loaded (results.json's teacher_checkpoints):
    nothing is fitted or downloaded for them here."""
    members = spec.teachers.members
    unknown = sorted(set(used) - set(members))
    if unknown:
        raise ConfigError(f"teachers {unknown} of results.json are not in the recorded teachers.members")
    chosen = {}
    for name in (n for n in members if n in used):  # the run's order (results.json sorts its keys)
        member, source = members[name], str(used[name])
        if not member.random_weights and not source.startswith("torchvision weights"):
            member = replace(member, checkpoint=source)
        chosen[name] = replace(member, fit_if_missing=False)
    return TeachersSpec(chosen)


def load_run(
    run_dir: Path, datamodules: list[str] | None = None
) -> tuple[TensorDataModule, nn.Module, TeacherEnsemble | None, dict[str, Plain]]:
    """(datamodule, student, teachers or None, results) of a finished kd-train run.

    The run is rebuilt from what it wrote, read as data, through the typed specs of any run
    (kd_lightning.config.run_spec): the datamodule must be one of kd_lightning's (or a class named in
    `datamodules`, from the command line, never from the folder), no `_target_` in the file is
    instantiated, transforms come from an allowlist, models from the registry and weights with
    weights_only=True (kd_lightning.data.from_config, kd_lightning.models)."""
    for name in (RESOLVED, "student.pt", "results.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir} is not a finished kd-train run folder: {name} is missing")
    results = read_results(run_dir / "results.json")
    spec = parse_run(read_recorded_config(run_dir / RESOLVED))
    dm = instantiate_datamodule(spec.data.config, allowed=datamodules or [])
    dm.setup("fit")
    student = load_model(run_dir / "student.pt")
    teachers = None
    used = {
        k: plain_str(v, f"teacher_checkpoints.{k}")
        for k, v in plain_map(results.get("teacher_checkpoints"), "teacher_checkpoints").items()
    }
    if used:
        teachers = build_teachers(
            recorded_teachers(spec, used),
            dm.num_classes,
            dm.input_shape,
            str(results.get("data") or dm.name),
            spec.data.config,
            spec.paths.cache_dir,
        )
    return dm, student, teachers, results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kd-eval", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders written by kd-train")
    p.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma-separated; '' for none")
    p.add_argument("--severities", default="0,1,2,3,4,5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="where to write (default: RUN_DIR/eval)")
    p.add_argument(
        "--datamodule",
        action="append",
        default=[],
        metavar="CLASS",
        help="a datamodule class of your own that the runs may name (data._target_); kd_lightning's own are "
        "always allowed, and nothing a run folder names is imported otherwise",
    )
    a = p.parse_args(argv)
    try:
        severities = [int(s) for s in a.severities.split(",") if s.strip()]
    except ValueError:
        config_error_exit(f"--severities must be integers 0..5, got {a.severities!r}")
    students: list[Plain] = []
    try:
        for run in a.runs:
            dm, student, teachers, _ = load_run(run, a.datamodule)
            eval_cfg = check_eval_cfg(
                {
                    "metrics": True,
                    "corruptions": [c for c in a.corruptions.split(",") if c],
                    "severities": severities,
                    "seed": a.seed,
                },
                dm.input_shape,
            )
            out = (a.out / run.name) if a.out and len(a.runs) > 1 else (a.out or run / "eval")
            result = evaluate_and_write(student, teachers, dm, eval_cfg, out)
            print(f"\n## {run}\n\n{robustness_table(result)}\n\nwritten to {out}")
            students += [
                {"model": run.name, "corruption": r["corruption"], "severity": r["severity"], "acc": r["acc"]}
                for r in read_rows(result["robustness"])
                if r["model"] == "student"
            ]
    except ConfigError as e:
        config_error_exit(e)
    if len(a.runs) > 1 and students:
        path = plot_robustness(students, (a.out or Path(".")) / "robustness.png", "students")
        print(f"\nstudents compared: {path}")


if __name__ == "__main__":
    main()
