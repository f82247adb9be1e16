"""The statistics of a set of runs, for kd-report, the notebook and the benchmarks: every results.json under a
folder as a table (`collect`), runs grouped by their labels and by every setting that differs between them
but the seed (`summarize`, `varying_settings`), mean ± std with the 95 % t interval over runs and a verdict
that names a best row only when its interval clears every other, and the intervals of a gain over a
control (`gain_interval`, Welch) or of paired differences (`paired_interval`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

GROUP_KEYS = ("data", "student", "teacher_set", "distill", "distance")
SETTINGS = "config.resolved.yaml"  # a run's config, which the report compares across runs


def settings(run_dir: Path) -> dict[str, str]:
    """A run's resolved config as flat `key: value` text (`optim.lr: 0.01`), without the keys that do not
    change what it computes (kd_lightning.engine.resume.comparable) and the seed."""
    from omegaconf import OmegaConf

    from kd_lightning.config.hydra import to_plain
    from kd_lightning.config.specs import flatten
    from kd_lightning.engine.resume import comparable

    path = run_dir / SETTINGS
    if not path.is_file():
        return {}
    try:
        plain = to_plain(OmegaConf.load(path), str(path), resolve=False)
    except Exception:  # an unreadable config: the run is still reported, by its results
        return {}
    # as resume=auto compares configs: without the neutral keys, folders written relative to paths.*, so
    # that each run's own folder (trainer.default_root_dir, checkpoint dirpaths) is not a setting
    flat = flatten(comparable(plain), skip=("seed",)) if isinstance(plain, dict) else {}
    return {k: str(v) for k, v in flat.items()}


def varying_settings(df: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The config keys whose values differ between the finished runs and that `keys` do not already tell
    apart (a key that is constant within every group of `keys` is one of them, said another way)."""
    ok = df[df["status"] == "ok"] if "status" in df else df
    keys = [k for k in keys if k in ok.columns]
    out = []
    for column in [c for c in ok.columns if c.startswith("cfg:")]:
        if ok[column].nunique(dropna=False) <= 1:
            continue
        if keys and (ok.groupby(keys, dropna=False)[column].nunique(dropna=False) <= 1).all():
            continue
        out.append(column)
    return out


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
        row.update({f"cfg:{k}": v for k, v in settings(path.parent).items()})
        row["run_dir"] = str(path.parent)
        row["n_teachers"] = (
            0 if r.get("teacher_set", "none") == "none" else len(str(r.get("teacher_set")).split("+"))
        )
        for name, acc in (r.get("teacher_test_acc") or {}).items():
            row[f"teacher_acc/{name}"] = acc
        rows.append(row)
        if r.get("status") == "ok" and r.get("baseline_test_acc") is not None:
            rows.append(baseline_row(row, r["baseline_test_acc"]))
    # A job killed before it could write anything (OOM, node lost) still left Hydra's .hydra/ folder.
    for hydra_dir in sorted(Path(root).rglob(".hydra")):
        job = hydra_dir.parent
        if not (job / "results.json").exists() and (hydra_dir / "overrides.yaml").exists():
            overrides = (hydra_dir / "overrides.yaml").read_text().replace("\n", " ").strip()
            rows.append(
                {"status": "missing", "error": f"no results.json; overrides {overrides}", "run_dir": str(job)}
            )
    df = pd.DataFrame(rows)
    if "baseline_of" in df:  # the jobs of a sweep share one student-alone baseline per (data, student, seed)
        key = [k for k in ("data", "student", "seed", "trainer", "optim", "scheduler") if k in df]
        base = df["baseline_of"].notna()
        df = pd.concat([df[~base], df[base].drop_duplicates(subset=key)], ignore_index=True)
    return df


BASELINE = "none (student alone)"


def baseline_row(row: dict, acc: float) -> dict:
    """The student-alone run that `baseline=true` trained beside a KD run (same seed, optimiser, epochs)."""
    keep = ("status", "seed", "data", "student", "trainer", "optim", "scheduler", "experiment")
    return {
        **{k: row[k] for k in keep if k in row},
        "teacher_set": BASELINE,
        "distill": "none",
        "distance": "none",
        "n_teachers": 0,
        "test_acc": acc,
        "baseline_of": row["run_dir"],
        "run_dir": row["run_dir"] + " (baseline)",
    }


def is_control(label: object) -> bool:
    """A row without teachers: the baseline, or a no-teacher point of a subset sweep."""
    return str(label) in ("none", BASELINE)


def _fmt(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    std = 0.0 if std is None or math.isnan(std) else std
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _half_width(std: float, n: int, level: float = 0.95) -> float:
    """Half-width of the t confidence interval of a mean of n runs (inf when n < 2: nothing to claim)."""
    if n < 2:
        return math.inf
    from scipy.stats import t  # scipy comes with scikit-learn

    return float(t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))


def gain_interval(
    treated: Sequence[float], control: Sequence[float], level: float = 0.95
) -> tuple[float, float]:
    """Difference of means and the half-width of its Welch t interval (unequal variances): the gain of a
    method over a control with the uncertainty of both (inf when either has fewer than 2 runs)."""
    a, b = [float(v) for v in treated], [float(v) for v in control]
    diff = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return diff, math.inf
    from scipy.stats import t

    va = sum((v - sum(a) / len(a)) ** 2 for v in a) / (len(a) - 1) / len(a)
    vb = sum((v - sum(b) / len(b)) ** 2 for v in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return diff, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return diff, float(t.ppf(0.5 + level / 2, df) * math.sqrt(va + vb))


def paired_interval(
    treated: Sequence[float], control: Sequence[float], level: float = 0.95
) -> tuple[float, float]:
    """Mean of the paired differences treated[i] − control[i] and the half-width of its t interval: for runs
    that share everything but the method (the same labelled subset, the same initial weights)."""
    d = [float(a) - float(b) for a, b in zip(treated, control, strict=True)]
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean, math.inf
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1))
    return mean, float(t.ppf(0.5 + level / 2, len(d) - 1) * sd / math.sqrt(len(d)))


def summarize(
    df: pd.DataFrame, keys: Sequence[str] = GROUP_KEYS, metric: str = "test_acc", all_settings: bool = True
) -> pd.DataFrame:
    """Mean ± std of `metric` over seeds for each group, its 95 % confidence interval (t, over runs), and
    `verdict`: "best" only when the top row's interval clears every other row's; otherwise the rows whose
    intervals overlap the top row's are all "tied" (with n = 1 nothing can be claimed: all tied). With
    `all_settings`, the groups are also split by every setting that differs between the runs (`cfg:<key>`)."""
    keys = [k for k in keys if k in df.columns]
    if all_settings:
        keys += [k for k in varying_settings(df, keys) if k not in keys]  # never pooled into one row
    ok = df[df.get("status") == "ok"] if "status" in df else df
    ok = ok[ok[metric].notna()] if metric in ok else ok.iloc[0:0]
    failed = df[df.get("status") != "ok"] if "status" in df else df.iloc[0:0]
    if ok.empty:
        return pd.DataFrame(columns=[*keys, "mean", "std", "n", "ci95", "failed", "verdict", "best"])
    g = ok.groupby(keys, dropna=False)[metric]
    table = g.agg(["mean", "std", "count"]).reset_index().rename(columns={"count": "n"})
    table["std"] = table["std"].fillna(0.0)
    table["ci95"] = [_half_width(sd, int(n)) for sd, n in zip(table["std"], table["n"], strict=True)]
    nf = (
        failed.groupby(keys, dropna=False).size()
        if not failed.empty and set(keys) <= set(failed.columns)
        else None
    )
    table["failed"] = [
        int(nf.get(tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]], 0)) if nf is not None else 0
        for _, r in table.iterrows()
    ]
    table = table.sort_values("mean", ascending=False).reset_index(drop=True)
    top_lo = table["mean"][0] - table["ci95"][0]
    overlaps = [i > 0 and table["mean"][i] + table["ci95"][i] >= top_lo for i in range(len(table))]
    if len(table) == 1:
        verdicts = [""]
    elif any(overlaps):
        verdicts = ["tied" if i == 0 or overlaps[i] else "" for i in range(len(table))]
    else:
        verdicts = ["best"] + [""] * (len(table) - 1)
    table["verdict"] = verdicts
    table["best"] = table["verdict"] == "best"
    return table


def to_markdown(table: pd.DataFrame, metric: str = "test_acc") -> str:
    keys = [c for c in table.columns if c not in ("mean", "std", "n", "ci95", "failed", "verdict", "best")]
    head = [*(k.removeprefix("cfg:") for k in keys), f"{metric} (%) mean ± std", "95% CI ±", "n", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cell = _fmt(r["mean"], r["std"])
        if r["verdict"] == "best":
            cell = f"**{cell}** (best)"
        elif r["verdict"] == "tied":
            cell = f"{cell} (tied)"
        ci = "—" if math.isinf(r["ci95"]) else f"{100 * r['ci95']:.2f}"
        lines.append(
            "| "
            + " | ".join([*(str(r[k]) for k in keys), cell, ci, str(int(r["n"])), str(int(r["failed"]))])
            + " |"
        )
    note = (
        "\n\nbest = its 95 % confidence interval (t over runs) lies above every other row's; tied = the "
        "intervals overlap the top row's, so no winner can be claimed from these runs."
    )
    return "\n".join(lines) + note
