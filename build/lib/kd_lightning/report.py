"""kd-report: every results.json under a folder → one table (CSV + Markdown) and plots.

Rows group runs by teacher set × distance × student (and any other varying override), columns give
mean ± std over seeds and the number of runs; failed runs are counted and listed, never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

GROUP_KEYS = ("data", "student", "teacher_set", "distill", "distance")


def collect(root: str | Path) -> pd.DataFrame:
    """One row per run (results.json) under `root`, failed runs included."""
    rows = []
    for path in sorted(Path(root).rglob("results.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            rows.append({"status": "unreadable", "error": str(e), "run_dir": str(path.parent)})
            continue
        row = {k: v for k, v in r.items() if not isinstance(v, dict | list)}
        row["run_dir"] = str(path.parent)
        row["n_teachers"] = (
            0 if r.get("teacher_set", "none") == "none" else len(str(r.get("teacher_set")).split("+"))
        )
        for name, acc in (r.get("teacher_test_acc") or {}).items():
            row[f"teacher_acc/{name}"] = acc
        rows.append(row)
    # A job killed before it could write anything (OOM, node lost) still left Hydra's .hydra/ folder.
    for hydra_dir in sorted(Path(root).rglob(".hydra")):
        job = hydra_dir.parent
        if not (job / "results.json").exists() and (hydra_dir / "overrides.yaml").exists():
            overrides = (hydra_dir / "overrides.yaml").read_text().replace("\n", " ").strip()
            rows.append(
                {"status": "missing", "error": f"no results.json; overrides {overrides}", "run_dir": str(job)}
            )
    return pd.DataFrame(rows)


def _fmt(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    std = 0.0 if std is None or math.isnan(std) else std
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def summarize(df: pd.DataFrame, keys: Sequence[str] = GROUP_KEYS, metric: str = "test_acc") -> pd.DataFrame:
    """Mean ± std of `metric` over seeds for each group; `best` marks the highest mean."""
    keys = [k for k in keys if k in df.columns]
    ok = df[df.get("status") == "ok"] if "status" in df else df
    failed = df[df.get("status") != "ok"] if "status" in df else df.iloc[0:0]
    if ok.empty:
        table = pd.DataFrame(columns=[*keys, "mean", "std", "n", "failed", "best"])
    else:
        g = ok.groupby(keys, dropna=False)[metric]
        table = g.agg(["mean", "std", "count"]).reset_index().rename(columns={"count": "n"})
        table["std"] = table["std"].fillna(0.0)
        nf = (
            failed.groupby(keys, dropna=False).size()
            if not failed.empty and set(keys) <= set(failed.columns)
            else None
        )
        table["failed"] = [
            int(nf.get(tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]], 0))
            if nf is not None
            else 0
            for _, r in table.iterrows()
        ]
        table["best"] = table["mean"] == table["mean"].max()
        table = table.sort_values("mean", ascending=False).reset_index(drop=True)
    return table


def to_markdown(table: pd.DataFrame, metric: str = "test_acc") -> str:
    keys = [c for c in table.columns if c not in ("mean", "std", "n", "failed", "best")]
    head = [*keys, f"{metric} (%) mean ± std", "n", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cell = _fmt(r["mean"], r["std"])
        if r["best"]:
            cell = f"**{cell}** (best)"
        lines.append(
            "| "
            + " | ".join([*(str(r[k]) for k in keys), cell, str(int(r["n"])), str(int(r["failed"]))])
            + " |"
        )
    return "\n".join(lines)


def plot(df: pd.DataFrame, table: pd.DataFrame, out: Path, metric: str = "test_acc") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if table.empty:
        return paths
    label_keys = [
        k
        for k in ("teacher_set", "distance", "distill", "student")
        if k in table.columns and table[k].nunique() > 1
    ] or ["teacher_set"]
    labels = [" / ".join(str(r[k]) for k in label_keys) for _, r in table.iterrows()]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(table) + 2), 4))
    ax.bar(range(len(table)), 100 * table["mean"], yerr=100 * table["std"], capsize=4, color="tab:blue")
    ax.set_xticks(range(len(table)), labels, rotation=45, ha="right")
    ax.set_ylabel(f"student {metric} (%)")
    lo = 100 * (table["mean"] - table["std"]).min()
    ax.set_ylim(max(0, lo - 5), min(100, 100 * (table["mean"] + table["std"]).max() + 2))
    ax.set_title("student accuracy per teacher set (mean ± std over seeds)")
    fig.tight_layout()
    paths.append(out / "accuracy_by_teacher_set.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    ok = df[df["status"] == "ok"] if "status" in df else df
    if "n_teachers" in ok and not ok.empty:
        g = ok.groupby("n_teachers")[metric].agg(["mean", "std"]).reset_index().fillna(0.0)
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.errorbar(g["n_teachers"], 100 * g["mean"], yerr=100 * g["std"], marker="o", capsize=4)
        ax.set_xlabel("number of teachers")
        ax.set_ylabel(f"student {metric} (%)")
        ax.set_xticks(sorted(g["n_teachers"].unique()))
        ax.set_title("accuracy vs number of teachers")
        fig.tight_layout()
        paths.append(out / "accuracy_vs_n_teachers.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(
    root: str | Path,
    out: str | Path | None = None,
    keys: Iterable[str] = GROUP_KEYS,
    metric: str = "test_acc",
    plots: bool = True,
) -> tuple[pd.DataFrame, str]:
    root = Path(root)
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    df = collect(root)
    if df.empty:
        raise SystemExit(f"kd-report: no results.json under {root}")
    table = summarize(df, list(keys), metric)
    md = to_markdown(table, metric)
    failed = df[df["status"] != "ok"] if "status" in df else df.iloc[0:0]
    if not failed.empty:
        md += "\n\nFailed runs:\n" + "\n".join(
            f"- {r['run_dir']}: {r.get('status')} — {r.get('error', '')}" for _, r in failed.iterrows()
        )
    df.to_csv(out / "runs.csv", index=False)
    table.to_csv(out / "report.csv", index=False)
    (out / "report.md").write_text(md + "\n")
    if plots:
        plot(df, table, out, metric)
    return table, md


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kd-report", description=__doc__.splitlines()[0])
    p.add_argument("path", help="a multirun folder (or any folder holding results.json files)")
    p.add_argument("--out", help="where to write report.csv, report.md and the plots (default: PATH)")
    p.add_argument("--metric", default="test_acc", help="column to aggregate (default: test_acc)")
    p.add_argument(
        "--by", default=",".join(GROUP_KEYS), help=f"grouping keys (default: {','.join(GROUP_KEYS)})"
    )
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    _, md = write_report(a.path, a.out, a.by.split(","), a.metric, plots=not a.no_plots)
    print(md)
    print(f"\nwritten: {Path(a.out or a.path) / 'report.md'}, report.csv, runs.csv and plots")


if __name__ == "__main__":
    main()
