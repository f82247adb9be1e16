"""The readable end-of-run table (rich), from the same dict that goes into results.json."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table

from kd_lightning.plain import Plain, plain_map, plain_num


def _pct(v: Plain) -> str:
    return "—" if v is None else f"{100 * plain_num(v, 'an accuracy'):.2f}%"


def print_summary(results: Mapping[str, Plain], console: Console | None = None) -> None:
    console = console or Console()
    title = f"kd_lightning · data={results.get('data')} student={results.get('student')} teachers={results.get('teachers')} distill={results.get('distill')} seed={results.get('seed')}"
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    table.add_column("role")
    table.add_column("test acc", justify="right")
    teacher_acc = plain_map(results.get("teacher_test_acc"), "teacher_test_acc")
    for name, acc in teacher_acc.items():
        table.add_row(name, "teacher", _pct(acc))
    if results.get("teacher_ensemble_test_acc") is not None and len(teacher_acc) > 1:
        table.add_row("ensemble", "teachers' mean logits", _pct(results["teacher_ensemble_test_acc"]))
    if results.get("baseline_test_acc") is not None:
        table.add_row(
            str(results.get("student")), "student alone (baseline)", _pct(results["baseline_test_acc"])
        )
    role = "student + teachers" if results.get("teacher_test_acc") else "student"
    table.add_row(str(results.get("student")), role, _pct(results.get("test_acc")), style="bold")
    console.print(table)
    extra = [
        f"val acc {_pct(results.get('val_acc'))}"
        if results.get("val_acc") is not None
        else "no validation split",
        f"fit {plain_num(results.get('fit_seconds', 0), 'fit_seconds'):.1f}s",
    ]
    if results.get("last_test_acc") is not None:
        extra.append(f"last epoch test {_pct(results['last_test_acc'])}")
    if results.get("best_test_acc") is not None:
        extra.append(
            f"best epoch by test {_pct(results['best_test_acc'])} (epoch {results['best_test_epoch']}, test-selected)"
        )
    if results.get("teacher_agreement") is not None:
        extra.append(f"student/teacher agreement {_pct(results['teacher_agreement'])}")
    test, baseline = results.get("test_acc"), results.get("baseline_test_acc")
    if baseline is not None and test is not None:
        gain = plain_num(test, "test_acc") - plain_num(baseline, "baseline_test_acc")
        extra.append(f"gain over baseline {100 * gain:+.2f} pts")
    console.print(" · ".join(extra))
    console.print(f"results: {results.get('output_dir')}/results.json")
