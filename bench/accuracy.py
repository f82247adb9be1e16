"""make bench-accuracy: gallo2020 and landro2021 against the student alone, over seeds, mean ± std.

Runs the real CLI (Hydra multirun, one process per experiment), then reads every results.json.
Teachers are fitted on first use and cached, so a second invocation only retrains the students.
Usage: python bench/accuracy.py [--seeds 0,1,2] [--out bench/results/accuracy]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multirun import run_quietly  # noqa: E402

from kd_lightning.report import collect, summarize, to_markdown  # noqa: E402

QUIET = ["trainer.enable_progress_bar=false", "print_summary=false", "logger=none"]
SETTINGS = {
    "student alone": ["experiment=gallo2020", "teachers=none", "distill=none"],
    "gallo2020 (1 teacher)": ["experiment=gallo2020"],
    "landro2021 (2 teachers, concat)": ["experiment=landro2021"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "accuracy"))
    a = p.parse_args()
    out = Path(a.out) / time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for label, overrides in SETTINGS.items():
        folder = out / label.split(" ")[0]
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "kd_lightning.train",
            "-m",
            *overrides,
            *QUIET,
            f"seed={a.seeds}",
            f"hydra.sweep.dir={folder}",
        ]
        code = run_quietly(cmd, "bench-accuracy", f"{label}: {' '.join(cmd[2:])}")
        if code != 0:
            raise SystemExit(f"[bench-accuracy] {label} failed (exit {code})")
        df = collect(folder)
        row = summarize(df, ["teacher_set"]).iloc[0]
        teachers = {c.split("/", 1)[1]: df[c].mean() for c in df.columns if c.startswith("teacher_acc/")}
        rows.append((label, row["mean"], row["std"], int(row["n"]), teachers, time.perf_counter() - t0))
    base = rows[0][1]
    print(
        "\n| setting | student test acc (%) mean ± std | n | gain vs alone (pts) | teachers' test acc (%) | wall s |"
    )
    print("|---|---|---|---|---|---|")
    for label, mean, std, n, teachers, wall in rows:
        t = ", ".join(f"{k} {100 * v:.2f}" for k, v in teachers.items()) or "—"
        gain = "—" if label == "student alone" else f"{100 * (mean - base):+.2f}"
        print(f"| {label} | {100 * mean:.2f} ± {100 * std:.2f} | {n} | {gain} | {t} | {wall:.0f} |")
    print(f"\nruns under {out}")
    print("\n" + to_markdown(summarize(collect(out), ["experiment", "teacher_set", "distill"])))


if __name__ == "__main__":
    main()
