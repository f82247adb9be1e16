"""Metrics beyond accuracy: macro F1, calibration (ECE), teacher agreement, robustness to degraded inputs."""

from kd_lightning.evaluation.corruptions import CORRUPTIONS, corrupt
from kd_lightning.evaluation.metrics import classification_metrics, expected_calibration_error, macro_f1
from kd_lightning.evaluation.robustness import (
    evaluate_models,
    plot_robustness,
    robustness_summary,
    robustness_table,
)

__all__ = [
    "CORRUPTIONS",
    "classification_metrics",
    "corrupt",
    "evaluate_models",
    "expected_calibration_error",
    "macro_f1",
    "plot_robustness",
    "robustness_summary",
    "robustness_table",
]
