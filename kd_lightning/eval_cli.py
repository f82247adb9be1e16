"""kd-eval: metrics beyond accuracy and robustness curves for finished runs, from their folders.

    kd-eval RUN_DIR [RUN_DIR ...] [--corruptions gaussian_noise,blur] [--severities 0,1,2,3,4,5] [--out DIR]

Each run is rebuilt from what it wrote (config.resolved.yaml, student.pt, results.json's teacher files);
nothing is trained. With several runs, their students are also drawn on one plot (OUT/robustness.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kd_lightning.errors import ConfigError
from kd_lightning.evaluation.corruptions import CORRUPTIONS
from kd_lightning.evaluation.robustness import plot_robustness, robustness_table
from kd_lightning.evaluation.run_eval import check_eval_cfg, evaluate_and_write
from kd_lightning.models import load_model
from kd_lightning.results import read_results

RESOLVED = "config.resolved.yaml"


def load_run(run_dir: Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(datamodule, student, teachers or None, results) of a finished kd-train run."""
    from kd_lightning.build import build_teacher_ensemble, instantiate_datamodule

    for name in (RESOLVED, "student.pt", "results.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir} is not a finished kd-train run folder: {name} is missing")
    results = read_results(run_dir / "results.json")
    cfg = OmegaConf.load(run_dir / RESOLVED)
    dm = instantiate_datamodule(cfg.data)
    dm.setup("fit")
    student = load_model(run_dir / "student.pt")
    teachers = None
    used = results.get("teacher_checkpoints") or {}
    if used:
        members = {n: m for n, m in cfg.teachers.members.items() if n in used}
        for n in members:
            members[n].checkpoint = used[n]
            members[n].fit_if_missing = False
        cfg.teachers.members = members
        cfg.teachers.use = None
        teachers = build_teacher_ensemble(cfg, dm, str(results.get("data") or dm.name))
    return dm, student, teachers, results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kd-eval", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders written by kd-train")
    p.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma-separated; '' for none")
    p.add_argument("--severities", default="0,1,2,3,4,5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="where to write (default: RUN_DIR/eval)")
    a = p.parse_args(argv)
    try:
        severities = [int(s) for s in a.severities.split(",") if s.strip()]
    except ValueError:
        print(f"kd-eval: --severities must be integers 0..5, got {a.severities!r}", file=sys.stderr)
        sys.exit(2)
    students = []
    try:
        for run in a.runs:
            dm, student, teachers, _ = load_run(run)
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
                dict(r, model=f"{run.name}") for r in result["robustness"] if r["model"] == "student"
            ]
    except ConfigError as e:
        print(f"kd-eval: {e}", file=sys.stderr)
        sys.exit(2)
    if len(a.runs) > 1 and students:
        path = plot_robustness(students, (a.out or Path(".")) / "robustness.png", "students")
        print(f"\nstudents compared: {path}")


if __name__ == "__main__":
    main()
