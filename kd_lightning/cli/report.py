"""kd-report: every results.json under a folder → one table (CSV + Markdown) and plots.

Rows group runs by data × student × teacher set × method × distance and by every other setting that differs
between the runs but the seed (read from each run's config.resolved.yaml: `optim.lr`, `data.batch_size`,
...), shown as columns; columns give mean ± std over seeds, the 95 % interval and the number of runs; failed
runs are counted and listed, never dropped silently. `--by` groups by the keys it names: the report then says
which settings differ inside its rows. The plots follow the table's rows and draw its 95 % intervals.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from kd_lightning.analysis.stats import (  # noqa: F401  (kd-report's statistics live in the library)
    BASELINE,
    GROUP_KEYS,
    SETTINGS,
    _fmt,
    _half_width,
    baseline_row,
    collect,
    gain_interval,
    is_control,
    paired_interval,
    summarize,
    to_markdown,
    varying_settings,
)
from kd_lightning.cli import config_error_exit

STATISTIC = "mean and 95 % interval (t over runs)"  # what the table reports, and so what the plots draw


def _ci_bars(half_widths: Iterable[float]) -> list[float]:
    """Error bars of 95 % half-widths in percent (none where n = 1: there is no interval to draw)."""
    return [0.0 if math.isinf(h) or math.isnan(h) else 100 * h for h in half_widths]


def plot(df: pd.DataFrame, table: pd.DataFrame, out: Path, metric: str = "test_acc") -> list[Path]:
    """The table's rows as bars (its statistic: mean and 95 % interval, n on each bar, the axis from 0), and
    the accuracy against the number of teachers, one line per combination of the other settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    if table.empty:
        return paths
    shown = [k for k in table.columns if k == "teacher_set" or k in GROUP_KEYS or k.startswith("cfg:")]
    label_keys = [k for k in shown if table[k].nunique() > 1] or ["teacher_set"]
    labels = [" / ".join(_setting(k, r[k]) for k in label_keys) for _, r in table.iterrows()]
    control = [is_control(r.get("teacher_set")) for _, r in table.iterrows()]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(table) + 2), 4.5))
    colors = ["tab:gray" if c else "tab:blue" for c in control]
    bars = _ci_bars(table["ci95"])
    ax.bar(range(len(table)), 100 * table["mean"], yerr=bars, capsize=4, color=colors)
    for i, (mean, n) in enumerate(zip(table["mean"], table["n"], strict=True)):  # n above each bar
        ax.text(i, min(96.0, 100 * mean + bars[i] + 1), f"n={int(n)}", ha="center", va="bottom", fontsize=7)
    for i, c in enumerate(control):  # the student alone, as a reference line across the chart
        if c:
            ax.axhline(100 * table["mean"][i], color="tab:gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(table)), labels, rotation=45, ha="right")
    ax.set_ylabel(f"student {metric} (%): {STATISTIC}", fontsize=8)
    ax.set_ylim(0, 100)  # honest axis: bars start at 0
    title = f"student accuracy, {STATISTIC}" + ("; gray = no teacher" if any(control) else "")
    ax.set_title(_wrap(title, fig), fontsize=10)
    fig.tight_layout()
    paths.append(out / "accuracy_by_teacher_set.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    extra = [k for k in table.columns if k.startswith("cfg:")]
    series = n_teacher_series(df, metric, extra)
    if series:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for label, g in series.items():
            ax.errorbar(
                g["n_teachers"], 100 * g["mean"], yerr=_ci_bars(g["ci95"]), marker="o", capsize=4, label=label
            )
            for x, y, n in zip(g["n_teachers"], g["mean"], g["n"], strict=True):
                ax.annotate(
                    f"n={int(n)}", (x, 100 * y), textcoords="offset points", xytext=(4, -10), fontsize=7
                )
        ax.set_xlabel("number of teachers")
        ax.set_ylabel(f"student {metric} (%): {STATISTIC}", fontsize=8)
        ax.set_ylim(0, 100)  # a gap of a few tenths is drawn as what it is
        # 0 = the student alone, when the runs hold it
        ax.set_xticks(sorted({int(n) for g in series.values() for n in g["n_teachers"]}))
        if len(series) > 1 or next(iter(series)):
            ax.legend(fontsize=8)
        ax.set_title(_wrap(f"accuracy vs number of teachers, {STATISTIC}", fig), fontsize=10)
        fig.tight_layout()
        paths.append(out / "accuracy_vs_n_teachers.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _setting(key: str, value: object) -> str:
    """A label part: a grouping key's value, a config setting as key=value."""
    return f"{key.removeprefix('cfg:')}={value}" if key.startswith("cfg:") else str(value)


SERIES_KEYS = ("distill", "distance", "student", "data")


def n_teacher_series(
    df: pd.DataFrame, metric: str = "test_acc", settings: Sequence[str] = ()
) -> dict[str, pd.DataFrame]:
    """Mean, 95 % half-width (`ci95`) and count of `metric` per number of teachers, one series for each
    combination of the keys that differ between the runs (method, distance, student, data, and the config
    `settings` the table splits by): different settings are never pooled into one point. The student-alone
    point (0 teachers) joins every series of its student and data."""
    ok = df[df["status"] == "ok"] if "status" in df else df
    if "n_teachers" not in ok or ok.empty or metric not in ok:
        return {}
    ok = ok[ok[metric].notna()]
    taught, alone = ok[ok["n_teachers"] > 0], ok[ok["n_teachers"] == 0]
    keys = [k for k in (*SERIES_KEYS, *settings) if k in taught and taught[k].nunique(dropna=False) > 1]
    out = {}
    groups = taught.groupby(keys, dropna=False) if keys else [((), taught)]
    for values, part in groups:
        values = values if isinstance(values, tuple) else (values,)
        label = " / ".join(f"{k.removeprefix('cfg:')}={v}" for k, v in zip(keys, values, strict=True))
        base = alone
        for k, v in zip(keys, values, strict=True):
            if (k in ("student", "data") or k.startswith("cfg:")) and k in base:
                base = base[base[k] == v]
        both = pd.concat([base, part])
        stats = both.groupby("n_teachers")[metric].agg(["mean", "std", "count"]).reset_index()
        stats = stats.rename(columns={"count": "n"})
        stats["std"] = stats["std"].fillna(0.0)
        stats["ci95"] = [_half_width(sd, int(n)) for sd, n in zip(stats["std"], stats["n"], strict=True)]
        out[label] = stats
    return out


def _wrap(title: str, fig) -> str:
    """A title broken into lines that fit the figure's width (about 7 characters per inch at 10 pt)."""
    import textwrap

    return "\n".join(textwrap.wrap(title, max(20, int(fig.get_figwidth() * 7))))


def write_report(
    root: str | Path,
    out: str | Path | None = None,
    keys: Iterable[str] | None = None,
    metric: str = "test_acc",
    plots: bool = True,
) -> tuple[pd.DataFrame, str]:
    """The table (and plots) of every run under `root`: grouped by GROUP_KEYS and every setting that differs,
    or by `keys` alone, with a warning naming the settings that then differ inside a row."""
    root = Path(root)
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    df = collect(root)
    if df.empty:
        config_error_exit(f"no results.json under {root} (kd-report reads the run folders beneath it)")
    table = summarize(df, list(keys or GROUP_KEYS), metric, all_settings=keys is None)
    md = to_markdown(table, metric)
    pooled = varying_settings(df, [k for k in table.columns if k in df.columns])
    if pooled:
        names = ", ".join(k.removeprefix("cfg:") for k in pooled)
        warning = (
            f"Warning: rows pool runs whose configs differ beyond the seed, in {names} (--by leaves them out)"
        )
        print(warning, file=sys.stderr)
        md += f"\n\n{warning}."
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
        "--by",
        help=f"group by these keys only (default: {','.join(GROUP_KEYS)} and every setting that differs "
        "between the runs but the seed; config keys as cfg:optim.lr)",
    )
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    keys = a.by.split(",") if a.by else None
    _, md = write_report(a.path, a.out, keys, a.metric, plots=not a.no_plots)
    print(md)
    print(f"\nwritten: {Path(a.out or a.path) / 'report.md'}, report.csv, runs.csv and plots")


if __name__ == "__main__":
    main()
