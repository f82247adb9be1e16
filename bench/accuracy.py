"""make bench-accuracy: Gallo et al. 2020 and Landro et al. 2021 (question 1) with teacher variance.

Every KD setting runs over teacher fits × student seeds (teachers.fit_seed refits every teacher with
shifted seeds; each fit is cached, so a second invocation only retrains the students); the student alone
over the student seeds. Each row gives mean ± std over all its runs, the gain over the student alone with
its 95 % Welch interval, the teachers' accuracy over their fits, and the spread of the student's mean
across teacher fits.

Parts (--only):
  gallo   the student alone; feature distance (gallo2020); controls: a random-weight teacher, logit KD
          from the same teacher; the adapter removed (a student whose penultimate layer has the teacher's
          320 dimensions, beside the same student with the adapter and alone); λ chosen on the validation
          split (a sweep at teacher fit 0, then the chosen λ over every fit × seed).
  landro  every subset of the 3-teacher pool, each multi-teacher subset with the three combine modes that
          apply to features of different sizes (concat, per_teacher, gate), and the whole pool through the
          logit-level multi-teacher methods CA-MKD and AE-KD, against the best single teacher.
Usage: python bench/accuracy.py [--only gallo,landro] [--rows SUBSTR,...] [--seeds 0,1,2]
       [--teacher-seeds 0,1,2] [--lambdas 3,10,30,100] [--jobs 2]
       [--into an earlier run's folder, to finish it] [--out bench/results/accuracy] [-- overrides]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multirun import finished, folder_for, mark_finished, pts, run_quietly  # noqa: E402

from kd_lightning.analysis.stats import collect, gain_interval  # noqa: E402

QUIET = ["trainer.enable_progress_bar=false", "print_summary=false", "logger=none"]
ALONE = "student alone"
# The teacher cnn_b's penultimate features have 320 dimensions; this student's last hidden layer matches
# them, so the feature distance needs no adapter (our choice of control: the only student change is that
# layer's width, 100 → 320).
WIDE = "student.hidden=[100,320]"
GALLO = {
    ALONE: ["experiment=gallo2020", "teachers=none", "distill=none"],
    "gallo2020 (1 teacher)": ["experiment=gallo2020"],
    # controls: is the gain the teacher's knowledge? the same term from an untrained teacher of the same
    # architecture; and the same trained teacher through Hinton KD on logits instead of features
    "random teacher (control)": ["experiment=gallo2020", "teachers.members.cnn_b.random_weights=true"],
    "logit KD, same teacher (control)": ["experiment=gallo2020", "distill=kd"],
    # is the gain the trainable adapter's? a 320-wide penultimate layer, alone / with / without the adapter
    "wide student alone": ["experiment=gallo2020", "teachers=none", "distill=none", WIDE],
    "wide student, with adapter": ["experiment=gallo2020", WIDE],
    "wide student, no adapter": ["experiment=gallo2020", WIDE, "distill.terms.feat.adapter=none"],
}
LAMBDA = "λ chosen on validation"
POOL = ("cnn_a", "cnn_b", "cnn_c")
# Landro question 1's combine modes for features of different sizes: side by side through one adapter, one
# adapter and distance per teacher summed, or per teacher weighted per sample by a learned gate on the input
MODES = ("concat", "per_teacher", "gate")
# the field's multi-teacher methods with per-sample teacher weights (issue 15's), on logits, the whole pool
MULTI = {"camkd": "CA-MKD (logits)", "aekd": "AE-KD (logits)"}
JOBS = [2]  # parallel kd-train processes per multirun (--jobs)
EXTRA: list[str] = []  # overrides after `--`, added to every run (a quick check: -- trainer.max_epochs=1)


def _multirun(label: str, overrides: list[str], seeds: str, folder: Path) -> pd.DataFrame:
    if finished(folder):
        print(f"[bench-accuracy] {label}: reusing the finished runs in {folder}", flush=True)
        return collect(folder)
    cmd = [sys.executable, "-m", "kd_lightning.train", "-m", *overrides, *QUIET, *EXTRA, f"seed={seeds}",
           "hydra/launcher=local", f"hydra.launcher.n_jobs={JOBS[0]}", f"hydra.sweep.dir={folder}"]  # fmt: skip
    code = run_quietly(cmd, "bench-accuracy", f"{label}: {' '.join(cmd[3:])}")
    if code != 0:
        raise SystemExit(f"[bench-accuracy] {label} failed (exit {code})")
    df = collect(folder)
    bad = df[df["status"] != "ok"]
    if len(bad):
        raise SystemExit(f"[bench-accuracy] {label}: {len(bad)} run(s) failed, see {folder}")
    mark_finished(folder)
    return df


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _interval(treated: pd.Series, control: pd.Series) -> str:
    return pts(*gain_interval(treated, control))


def _row(label: str, df: pd.DataFrame, alone: pd.Series, wall: float | None) -> str:
    acc = df["test_acc"]
    if "teacher_fit_seed" not in df or df["teacher_set"].eq("none").all():
        gain = spread = teachers = "—"
    else:
        gain = _interval(acc, alone)
        by_fit = df.groupby("teacher_fit_seed")["test_acc"].mean()
        spread = f"{100 * by_fit.std():.2f} ({len(by_fit)} fits)" if len(by_fit) > 1 else "—"
        cols = [c for c in df.columns if c.startswith("teacher_acc/") and df[c].notna().any()]
        fits = df.drop_duplicates("teacher_fit_seed")
        teachers = ", ".join(f"{c.split('/', 1)[1]} {_pct(fits[c].mean(), fits[c].std())}" for c in cols)
    took = "—" if wall is None else f"{wall:.0f}"
    return (
        f"| {label} | {_pct(acc.mean(), acc.std())} | {len(acc)} | {gain} | {teachers} | {spread} | {took} |"
    )


HEADER = (
    "| setting | student test acc (%) mean ± std | n | gain vs alone (pts) [95% CI] "
    "| teachers' test acc over fits (%) | std of the mean across teacher fits (pts) | wall s |\n"
    "|---|---|---|---|---|---|---|"
)


def gallo(out: Path, a: argparse.Namespace, wanted) -> list[str]:
    fits = [f"teachers.fit_seed={a.teacher_seeds}"]
    rows: dict[str, tuple[pd.DataFrame, float]] = {}
    for label, overrides in GALLO.items():
        if label != ALONE and not wanted(label):
            continue
        t0 = time.perf_counter()
        axis = [] if "teachers=none" in overrides else fits
        df = _multirun(label, [*overrides, *axis], a.seeds, out / folder_for(label))
        rows[label] = (df, time.perf_counter() - t0)
    lines = []
    if wanted(LAMBDA):
        # λ (the feature term's weight) chosen by the mean validation accuracy over the student seeds at the
        # first teacher fit; the test set is read only for the chosen λ, over every fit × seed.
        t0 = time.perf_counter()
        first = a.teacher_seeds.split(",")[0]
        sweep = _multirun(
            "λ sweep",
            ["experiment=gallo2020", f"distill.terms.feat.weight={a.lambdas}", f"teachers.fit_seed={first}"],
            a.seeds,
            out / "lambda_sweep",
        )
        sweep["weight"] = [
            float(OmegaConf.load(Path(d) / "config.resolved.yaml").distill.terms.feat.weight)
            for d in sweep["run_dir"]
        ]
        val = {lam: sweep[sweep["weight"] == float(lam)]["val_acc"].mean() for lam in a.lambdas.split(",")}
        chosen = max(val, key=val.get)
        lines.append(
            "λ sweep (mean validation acc over seeds, teacher fit "
            + first
            + "): "
            + ", ".join(f"λ {k}: {100 * v:.2f}" for k, v in val.items())
            + f" → λ = {chosen}"
        )
        df = _multirun(
            LAMBDA,
            ["experiment=gallo2020", f"distill.terms.feat.weight={chosen}", *fits],
            a.seeds,
            out / "lambda",
        )
        rows[f"{LAMBDA} (λ = {chosen})"] = (df, time.perf_counter() - t0)
    alone = rows[ALONE][0]["test_acc"]
    wide = rows.get("wide student alone", rows[ALONE])[0]["test_acc"]  # the wide rows' own control
    lines += ["", HEADER] + [
        _row(label, df, wide if label.startswith("wide") else alone, wall)
        for label, (df, wall) in rows.items()
    ]
    pairs = [
        ("gallo2020 (1 teacher)", "random teacher (control)"),
        ("gallo2020 (1 teacher)", "logit KD, same teacher (control)"),
        ("wide student, no adapter", "wide student alone"),
        ("wide student, with adapter", "wide student alone"),
        ("wide student, no adapter", "wide student, with adapter"),
    ]
    chosen_row = next((k for k in rows if k.startswith(LAMBDA)), None)
    if chosen_row:  # the chosen λ against the default λ 30, on test over every fit × seed
        pairs.append((chosen_row, "gallo2020 (1 teacher)"))
    for x, y in pairs:
        if x in rows and y in rows:
            lines.append(f"\n{x} minus {y}: {_interval(rows[x][0]['test_acc'], rows[y][0]['test_acc'])} pts")
    return lines


def landro(out: Path, a: argparse.Namespace, wanted) -> list[str]:
    fits = f"teachers.fit_seed={a.teacher_seeds}"
    t0 = time.perf_counter()
    alone = _multirun(
        ALONE, ["experiment=landro2021", "teachers=none", "distill=none"], a.seeds, out / "alone"
    )
    singles = _multirun(
        "single teachers",
        ["experiment=landro2021", "teachers.use=" + ",".join(f"[{m}]" for m in POOL), fits],
        a.seeds,
        out / "single",
    )
    groups = {("single", ts): df for ts, df in singles.groupby("teacher_set")}
    for mode in MODES:
        if not wanted(mode):
            continue
        df = _multirun(
            f"subsets of 2+ teachers, combine={mode}",
            [
                "experiment=landro2021",
                "sweep=teacher_subsets",
                "sweep_min_teachers=2",
                f"distill.terms.feat.combine={mode}",
                fits,
            ],  # fmt: skip
            a.seeds,
            out / mode,
        )
        groups |= {(mode, ts): d for ts, d in df.groupby("teacher_set")}
    for method, label in MULTI.items():
        if not wanted(label):
            continue
        df = _multirun(
            label,
            ["experiment=landro2021", f"distill={method}", f"teachers.use=[{','.join(POOL)}]", fits],
            a.seeds,
            out / method,
        )
        groups[(label, df["teacher_set"].iloc[0])] = df
    best_key = max((k for k in groups if k[0] == "single"), key=lambda k: groups[k]["test_acc"].mean())
    best = groups[best_key]["test_acc"]
    lines = [
        f"best single teacher (by mean test acc, a selection on the test set): {best_key[1]}",
        "",
        HEADER.replace("| wall s |", "| minus best single teacher (pts) [95% CI] |"),
    ]
    lines.append(_row(ALONE, alone, alone["test_acc"], None).rsplit("|", 2)[0] + "| — |")
    order = ["single", *MODES, *MULTI.values()]
    for (mode, ts), df in sorted(
        groups.items(), key=lambda kv: (kv[0][1].count("+"), order.index(kv[0][0]), kv[0][1])
    ):
        label = (
            ts if mode == "single" else f"{ts}, {mode}" if mode in MULTI.values() else f"{ts}, combine={mode}"
        )
        cell = "—" if (mode, ts) == best_key else _interval(df["test_acc"], best)
        lines.append(_row(label, df, alone["test_acc"], None).rsplit("|", 2)[0] + f"| {cell} |")
    # each pair of teachers against each of its two members alone: does combining beat the stronger one?
    lines.append("")
    for (mode, ts), df in groups.items():
        if mode in MODES and ts.count("+") == 1:
            for member in ts.split("+"):
                diff = _interval(df["test_acc"], groups[("single", member)]["test_acc"])
                lines.append(f"{ts}, combine={mode} minus {member}: {diff} pts")
    lines.append(f"\nwall {time.perf_counter() - t0:.0f} s")
    return lines


PARTS = {"gallo": gallo, "landro": landro}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(PARTS), help="parts: " + ", ".join(PARTS))
    p.add_argument(
        "--rows", default="", help="comma-separated substrings: run only the rows whose label has one"
    )
    p.add_argument("--seeds", default="0,1,2", help="student seeds")
    p.add_argument("--teacher-seeds", default="0,1,2", help="teachers.fit_seed values (teacher fits)")
    p.add_argument("--lambdas", default="3,10,30,100", help="the gallo λ sweep's values")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "accuracy"))
    p.add_argument("--into", help="the folder of an earlier invocation: its finished multiruns are reused")
    p.add_argument("--jobs", type=int, default=2, help="parallel kd-train processes")
    p.add_argument("extra", nargs="*", help="after --: overrides added to every kd-train run")
    a = p.parse_args()
    EXTRA.extend(a.extra)
    JOBS[0] = a.jobs
    unknown = [x for x in a.only.split(",") if x not in PARTS]
    if unknown:
        raise SystemExit(f"--only: unknown part(s) {unknown}; valid: {', '.join(PARTS)}")
    subs = [s for s in a.rows.split(",") if s]

    def wanted(label: str) -> bool:
        return not subs or any(s in label for s in subs)

    out = Path(a.into) if a.into else Path(a.out) / time.strftime("%Y%m%d-%H%M%S")
    t_start = time.perf_counter()
    report = [f"MNIST-1D; student seeds {a.seeds}; teacher fits (teachers.fit_seed) {a.teacher_seeds}"]
    for part in a.only.split(","):
        t0 = time.perf_counter()
        lines = PARTS[part](out / part, a, wanted)
        report += ["", f"## {part} ({time.perf_counter() - t0:.0f} s)", "", *lines]
        print("\n".join(report[-len(lines) - 3 :]), flush=True)
    report += ["", f"wall {time.perf_counter() - t_start:.0f} s; runs under {out}"]
    (out / "tables.md").write_text("\n".join(report) + "\n")
    print(f"\nwall {time.perf_counter() - t_start:.0f} s; tables: {out / 'tables.md'}")


if __name__ == "__main__":
    main()
