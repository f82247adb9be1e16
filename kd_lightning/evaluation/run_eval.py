"""Evaluation of a trained student (and its teachers) after a run, or later from its folder (`kd-eval`)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from kd_lightning.config.specs import EvalSpec, parse
from kd_lightning.data.base import TensorDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.evaluation.corruptions import check_corruptions
from kd_lightning.evaluation.robustness import (
    Predictor,
    evaluate_models,
    plot_robustness,
    read_rows,
    robustness_table,
)
from kd_lightning.files import write_text_atomic
from kd_lightning.plain import Plain
from kd_lightning.teachers.ensemble import TeacherEnsemble


def check_eval_cfg(cfg: EvalSpec | Mapping[str, Plain] | None, input_shape: tuple[int, ...]) -> EvalSpec:
    """Validate `evaluate.*` before training (corruptions need signals or images)."""
    spec = parse(EvalSpec, cfg, "evaluate")
    check_corruptions(spec.corruptions, spec.severities)
    if spec.corruptions and len(input_shape) not in (2, 3):
        raise ConfigError(
            f"evaluate.corruptions need signals (C, L) or images (C, H, W); this dataset's inputs are "
            f"{tuple(input_shape)}: use evaluate=none or evaluate.corruptions=[]"
        )
    if spec.corruptions and not spec.severities:
        raise ConfigError("evaluate.corruptions is set but evaluate.severities is empty; e.g. [0,1,2,3,4,5]")
    return spec


def predictor(student: nn.Module, teachers: TeacherEnsemble | None) -> Predictor:
    """Logits of the student, each teacher and (with several) the teachers' `ensemble`, in eval mode."""
    student.eval()

    def predict(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"student": student(x)}
        if teachers is not None:
            feats = teachers(x)
            out.update({name: feats[name]["logits"] for name in teachers.names})
            if len(teachers.names) > 1:
                out["ensemble"] = teachers.combined_logits(feats)
        return out

    return predict


def evaluate_and_write(
    student: nn.Module,
    teachers: TeacherEnsemble | None,
    dm: TensorDataModule,
    eval_cfg: EvalSpec,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
) -> dict[str, Plain]:
    """Run the evaluation; write evaluation.json, evaluation.md and (with corruptions) robustness.csv/.png."""
    names = ["student", *(teachers.names if teachers is not None else [])]
    reference = "ensemble" if len(names) > 2 else (names[1] if len(names) > 1 else None)
    result = evaluate_models(
        predictor(student, teachers),
        dm,
        eval_cfg.corruptions,
        eval_cfg.severities,
        eval_cfg.seed,
        reference=reference,
        device=device,
    )
    if "agreement" in result:
        result["agreement_reference"] = reference
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "evaluation.json", json.dumps(result, indent=1))
    write_text_atomic(out / "evaluation.md", robustness_table(result) + "\n")
    if result["robustness"]:
        table = io.StringIO()
        w = csv.DictWriter(table, fieldnames=["model", "corruption", "severity", "acc"])
        w.writeheader()
        w.writerows(read_rows(result["robustness"]))
        write_text_atomic(out / "robustness.csv", table.getvalue())
        plot_robustness(result["robustness"], out / "robustness.png", title=str(out.name))
    return result
