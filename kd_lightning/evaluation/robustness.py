"""Evaluate models on the clean test split and under every corruption × severity; table and plot."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import torch

from kd_lightning.data.base import TensorDataModule
from kd_lightning.evaluation.corruptions import check_corruptions, corrupt
from kd_lightning.evaluation.metrics import classification_metrics
from kd_lightning.plain import Plain, plain_list, plain_map, plain_num, plain_str

# normalised inputs → {model name: logits}, every model on the same batch (teachers forwarded once)
Predictor = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


class RobustnessRow(TypedDict):
    """One model's test accuracy under one corruption at one severity (0: clean)."""

    model: str
    corruption: str
    severity: int
    acc: float


def read_rows(value: Plain) -> list[RobustnessRow]:
    """The `robustness` entry of an evaluation (as written, or read back from JSON) as typed rows."""
    rows = []
    for i, r in enumerate(plain_list(value, "robustness")):
        row = plain_map(r, f"robustness[{i}]")
        rows.append(
            RobustnessRow(
                model=plain_str(row.get("model"), f"robustness[{i}].model"),
                corruption=plain_str(row.get("corruption"), f"robustness[{i}].corruption"),
                severity=int(plain_num(row.get("severity"), f"robustness[{i}].severity")),
                acc=plain_num(row.get("acc"), f"robustness[{i}].acc"),
            )
        )
    return rows


@torch.no_grad()
def evaluate_models(
    predict: Predictor,
    dm: TensorDataModule,
    corruptions: Sequence[str] = (),
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    reference: str | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Plain]:
    """`{"clean": {model: metrics}, "agreement": {model: top-1 agreement with reference},
    "robustness": [{model, corruption, severity, acc}]}` on the test split of `dm`.

    Corruptions act on the data as loaded (images scaled to [0, 1] and clipped there), then the
    datamodule's own normalisation applies, as in training. The test split is read batch by batch
    through the datamodule's public API, so datasets on disk work as in-memory ones do."""
    check_corruptions(list(corruptions), list(severities))
    dm.setup("test")
    y = dm.labels("test").cpu()
    scale = dm.input_std()
    settings = [(c, s) for c in corruptions for s in severities if s > 0]
    logits: dict[tuple[str, int], dict[str, list[torch.Tensor]]] = {}
    for i, raw in enumerate(dm.iter_split("test")):
        clip = raw.x.dtype == torch.uint8
        x = TensorDataModule._to_float(raw.x)
        for c, s in [(None, 0), *settings]:
            xc = x if c is None else corrupt(x, c, s, scale, seed * 100003 + i)
            if clip and c is not None:
                xc = xc.clamp(0, 1)
            predicted = predict(dm.prepare_batch(raw._replace(x=xc.to(device)), train=False).x)
            slot = logits.setdefault((c or "clean", s), {})
            for name, v in predicted.items():
                slot.setdefault(name, []).append(v.float().cpu())
    merged = {k: {n: torch.cat(v) for n, v in per.items()} for k, per in logits.items()}
    clean_logits = merged[("clean", 0)]
    out: dict[str, Plain] = {"clean": {n: classification_metrics(v, y) for n, v in clean_logits.items()}}
    if reference is not None and reference in clean_logits:
        ref = clean_logits[reference].argmax(1)
        out["agreement"] = {
            n: float((v.argmax(1) == ref).float().mean()) for n, v in clean_logits.items() if n != reference
        }
    rows: list[Plain] = []
    for c in corruptions:
        for s in severities:
            for name, v in (clean_logits if s == 0 else merged[(c, s)]).items():
                acc = float((v.argmax(1) == y).float().mean())
                rows.append({"model": name, "corruption": c, "severity": int(s), "acc": acc})
    out["robustness"] = rows
    return out


def robustness_summary(rows: Plain) -> dict[str, dict[str, float]]:
    """model → corruption → mean accuracy over the severities ≥ 1 (and `mean` over corruptions)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in read_rows(rows):
        if r["severity"] > 0:
            acc.setdefault(r["model"], {}).setdefault(r["corruption"], []).append(r["acc"])
    out: dict[str, dict[str, float]] = {}
    for model, per in acc.items():
        out[model] = {c: sum(v) / len(v) for c, v in per.items()}
        out[model]["mean"] = sum(out[model].values()) / len(per)
    return out


def robustness_table(result: Mapping[str, Plain]) -> str:
    """Markdown: per model, clean metrics and mean accuracy under each corruption (severities ≥ 1)."""
    summary = robustness_summary(result.get("robustness"))
    corruptions = sorted({r["corruption"] for r in read_rows(result.get("robustness"))})
    agree = {
        k: plain_num(v, f"agreement.{k}") for k, v in plain_map(result.get("agreement"), "agreement").items()
    }
    head = ["model", "acc", "macro F1", "ECE", "agreement", *corruptions, "mean corrupted"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, clean in plain_map(result.get("clean"), "clean").items():
        m = {k: plain_num(v, f"clean.{model}.{k}") for k, v in plain_map(clean, f"clean.{model}").items()}
        cells = [
            model,
            f"{100 * m['acc']:.2f}",
            f"{100 * m['macro_f1']:.2f}",
            f"{m['ece']:.4f}",
            f"{100 * agree[model]:.2f}" if model in agree else "—",
            *[f"{100 * summary.get(model, {}).get(c, float('nan')):.2f}" for c in corruptions],
            f"{100 * summary[model]['mean']:.2f}" if model in summary else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_robustness(value: Plain, path: str | Path, title: str = "") -> Path:
    """One panel per corruption: accuracy against severity, one line per model."""
    rows = read_rows(value)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corruptions = sorted({r["corruption"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(corruptions), figsize=(3.2 * len(corruptions), 3), squeeze=False)
    for ax, c in zip(axes[0], corruptions, strict=True):
        for m in models:
            pts = sorted((r["severity"], r["acc"]) for r in rows if r["corruption"] == c and r["model"] == m)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=m)
        ax.set_title(c)
        ax.set_xlabel("severity")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
