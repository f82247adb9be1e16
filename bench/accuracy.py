"""make bench-accuracy: gallo2020 and landro2021 against the student alone, with teacher variance.

Each KD setting (and the controls: a random-weight teacher, logit KD from the same teacher) runs over
teacher fits × student seeds (teachers.fit_seed refits every teacher with shifted
seeds; each fit is cached, so a second invocation only retrains the students); the student alone over the
student seeds. Prints mean ± std over all runs, the gain over the student alone with its 95 % Welch
interval, the teachers' accuracy over their fits, and the spread of the student's mean across teacher fits.
Usage: python bench/accuracy.py [--seeds 0,1,2] [--teacher-seeds 0,1,2] [--out bench/results/accuracy]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multirun import run_quietly  # noqa: E402

from kd_lightning.report import collect, gain_interval, summarize, to_markdown  # noqa: E402

QUIET = ["trainer.enable_progress_bar=false", "print_summary=false", "logger=none"]
SETTINGS = {
    "student alone": ["experiment=gallo2020", "teachers=none", "distill=none"],
    "gallo2020 (1 teacher)": ["experiment=gallo2020"],
    "landro2021 (2 teachers, concat)": ["experiment=landro2021"],
    # controls: is the gain the teacher's knowledge? the same term from an untrained teacher of the same
    # architecture; and the same trained teacher through Hinton KD on logits instead of features
    "random teacher (control)": ["experiment=gallo2020", "teachers.members.cnn_b.random_weights=true"],
    "logit KD, same teacher (control)": ["experiment=gallo2020", "distill=kd"],
}


def _multirun(label: str, overrides: list[str], seeds: str, folder: Path) -> None:
    cmd = [sys.executable, "-m", "kd_lightning.train", "-m", *overrides, *QUIET, f"seed={seeds}",
           f"hydra.sweep.dir={folder}"]  # fmt: skip
    code = run_quietly(cmd, "bench-accuracy", f"{label}: {' '.join(cmd[3:])}")
    if code != 0:
        raise SystemExit(f"[bench-accuracy] {label} failed (exit {code})")


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="student seeds")
    p.add_argument("--teacher-seeds", default="0,1,2", help="teachers.fit_seed values (teacher fits)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "accuracy"))
    a = p.parse_args()
    out = Path(a.out) / time.strftime("%Y%m%d-%H%M%S")
    t_start = time.perf_counter()
    runs = {}
    for label, overrides in SETTINGS.items():
        folder = out / label.split(" ")[0]
        t0 = time.perf_counter()
        teacher_axis = [] if "teachers=none" in overrides else [f"teachers.fit_seed={a.teacher_seeds}"]
        _multirun(label, [*overrides, *teacher_axis], a.seeds, folder)
        df = collect(folder)
        bad = df[df["status"] != "ok"]
        if len(bad):
            raise SystemExit(f"[bench-accuracy] {label}: {len(bad)} run(s) failed, see {folder}")
        runs[label] = (df, time.perf_counter() - t0)
    alone = runs["student alone"][0]["test_acc"]
    print(f"\nMNIST-1D; student seeds {a.seeds}; teacher fits (teachers.fit_seed) {a.teacher_seeds}")
    print("| setting | student test acc (%) mean ± std | n | gain vs alone (pts) [95% CI] "
          "| teachers' test acc over fits (%) | std of the mean across teacher fits (pts) | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for label, (df, wall) in runs.items():
        acc = df["test_acc"]
        if label == "student alone":
            gain = spread = teachers = "—"
        else:
            diff, half = gain_interval(acc, alone)
            gain = f"{100 * diff:+.2f} [{100 * (diff - half):+.2f}, {100 * (diff + half):+.2f}]"
            by_fit = df.groupby("teacher_fit_seed")["test_acc"].mean()
            spread = f"{100 * by_fit.std():.2f} ({len(by_fit)} fits)"
            cols = [c for c in df.columns if c.startswith("teacher_acc/")]
            fits = df.drop_duplicates("teacher_fit_seed")
            teachers = ", ".join(f"{c.split('/', 1)[1]} {_pct(fits[c].mean(), fits[c].std())}" for c in cols)
        print(
            f"| {label} | {_pct(acc.mean(), acc.std())} | {len(acc)} | {gain} | {teachers} | {spread} | {wall:.0f} |"
        )
    print(f"\nwall {time.perf_counter() - t_start:.0f} s; runs under {out}")
    print("\n" + to_markdown(summarize(collect(out), ["experiment", "teacher_set", "distill"])))


if __name__ == "__main__":
    main()
