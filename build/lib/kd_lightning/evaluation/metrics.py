"""Classification metrics computed from logits: accuracy, macro F1, expected calibration error, NLL."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def macro_f1(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of 2·TP / (2·TP + FP + FN); a class absent from both counts as F1 = 0
    only when it has support (classes with neither predictions nor samples are left out)."""
    scores = []
    for c in range(num_classes):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(sum(scores) / len(scores)) if scores else 0.0


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): Σ_b |B_b|/n · |accuracy(B_b) − mean confidence(B_b)|, equal-width bins."""
    conf, pred = probs.max(1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    ece = conf.new_zeros(())
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return float(ece)


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, bins: int = 15) -> dict[str, float]:
    logits = logits.float()
    probs = logits.softmax(1)
    pred = logits.argmax(1)
    return {
        "acc": float((pred == y).float().mean()),
        "macro_f1": macro_f1(pred, y, logits.shape[1]),
        "ece": expected_calibration_error(probs, y, bins),
        "nll": float(F.cross_entropy(logits, y)),
    }
