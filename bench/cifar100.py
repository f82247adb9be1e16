"""make bench-cifar100: the CIFAR-100 table of the CRD paper, rerun with kd_lightning, beside the published one.

Runs the chosen methods × pairs (experiment=cifar100/<teacher>_<student>, RepDistiller's protocol) × seeds
as one Hydra multirun, then prints and writes (Markdown + CSV) our student's test accuracy at the last and
at the best epoch, mean ± std over seeds, next to the numbers RepDistiller's and mdistiller's READMEs print
(bench/data/cifar100_published.json, with their source).

  python bench/cifar100.py --data-root DIR [--teachers DIR] [--pairs all|p1,p2] [--methods student,kd,crd]
                           [--seeds 0,1,2] [--jobs 1] [--out DIR] [-- extra overrides...]

--data-root holds cifar-100-python/ (data.download=true as an extra override fetches it). --teachers is a
folder of released teachers laid out as RepDistiller's fetch script and mdistiller's cifar_teachers.tar
leave them: <teacher>_vanilla/ckpt_epoch_240.pth. Without it each pair's teacher is trained first with
the same protocol (240 epochs) and cached. Method `student` is the student alone (cross-entropy only,
no teacher); any other name is a conf/distill choice, with the settings each pair's experiment gives it
(method_defaults: RepDistiller's layers for FitNet and SP, mdistiller's per-pair DKD β).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multirun import run_quietly  # noqa: E402

from kd_lightning.analysis.stats import collect  # noqa: E402

PUBLISHED = json.loads((ROOT / "bench" / "data" / "cifar100_published.json").read_text())
PAIRS = list(PUBLISHED["pairs"])
STUDENT_ALONE = ["teachers.use=[]", "distill=none"]


def _sweeps(pairs: list[str], methods: list[str]) -> list[tuple[str, list[str], list[str]]]:
    """(name, pairs, overrides) of each multirun: the methods, and the student alone (no teacher)."""
    runs = []
    distill = [m for m in methods if m != "student"]
    if distill:
        runs.append(("methods", pairs, [f"distill={','.join(distill)}"]))
    if "student" in methods:
        runs.append(("student", pairs, STUDENT_ALONE))
    return runs


def _command(pairs: list[str], overrides: list[str], a: argparse.Namespace, sweep_dir: Path) -> list[str]:
    cmd = [
        sys.executable, "-m", "kd_lightning.train", "-m",
        # the groups the experiments choose, named too: Hydra composes a multirun's base config without
        # its swept keys (experiment), and data.root / teachers.members.teacher must exist there
        "data=cifar100", "teachers=cifar100_teacher",
        "experiment=" + ",".join(f"cifar100/{p}" for p in pairs), *overrides,
        f"seed={a.seeds}", f"data.root={a.data_root}",
        "trainer.enable_progress_bar=false", "print_summary=false",
        f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    if a.teachers:
        cmd.append(
            f"teachers.members.teacher.checkpoint={Path(a.teachers).resolve()}/"
            "${teachers.members.teacher.arch.name}_vanilla/ckpt_epoch_240.pth"
        )
    if a.jobs > 1:
        cmd += ["hydra/launcher=local", f"hydra.launcher.n_jobs={a.jobs}"]
    return cmd + a.extra


def _method(row: pd.Series) -> str:
    return "student" if row.get("distill") == "none" else str(row.get("distill"))


def _cell(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "—"
    return f"{100 * v.mean():.2f} ± {100 * v.std(ddof=1):.2f}" if len(v) > 1 else f"{100 * v.iloc[0]:.2f}"


def _published(pair: str, method: str) -> str:
    for source, numbers in PUBLISHED["pairs"].get(pair, {}).items():
        if method in numbers:
            return f"{numbers[method]:.2f} ({source})"
    return "—"


def table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per pair × method: ours at the last and the best epoch, the teacher, the published number."""
    if "status" not in df or not (df["status"] == "ok").any():
        return pd.DataFrame(columns=["pair", "method"])
    ok = df[df["status"] == "ok"].copy()
    ok["pair"] = ok["experiment"].str.removeprefix("cifar100/")
    ok["method"] = ok.apply(_method, axis=1)
    rows = []
    for (pair, method), g in ok.groupby(["pair", "method"], sort=False):
        teacher = g["teacher_acc/teacher"] if "teacher_acc/teacher" in g else pd.Series(dtype=float)
        rows.append(
            {
                "pair": pair,
                "method": method,
                "ours, last epoch (%)": _cell(g["last_test_acc"]),
                "ours, best epoch (%) [test-selected]": _cell(g.get("best_test_acc", pd.Series(dtype=float))),
                "seeds": len(g),
                "teacher (ours, %)": _cell(teacher),
                "published (%)": _published(pair, method),
                "teacher (published, %)": _published(pair, "teacher"),
            }
        )
    order = {p: i for i, p in enumerate(PAIRS)}
    rows.sort(key=lambda r: (order.get(r["pair"], len(order)), r["method"] != "student", r["method"]))
    return pd.DataFrame(rows)


def _markdown(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--teachers", default=None, help="folder of <teacher>_vanilla/ckpt_epoch_240.pth files")
    p.add_argument("--pairs", default="all")
    p.add_argument("--methods", default="student,kd,crd,dkd")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cifar100"))
    p.add_argument("extra", nargs="*", help="more kd-train overrides, after --")
    a = p.parse_args()
    pairs = PAIRS if a.pairs == "all" else a.pairs.split(",")
    unknown = [x for x in pairs if x not in PAIRS]
    if unknown:
        raise SystemExit(f"unknown pair(s) {unknown}; the CRD table's: {', '.join(PAIRS)}")
    out = Path(a.out) / time.strftime("%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    failed = False
    for name, group, overrides in _sweeps(pairs, a.methods.split(",")):
        cmd = _command(group, overrides, a, out / name)
        failed |= run_quietly(cmd, "bench-cifar100") != 0
    wall = time.perf_counter() - t0
    df = collect(out)
    result = table(df)
    out.mkdir(parents=True, exist_ok=True)
    result.to_csv(out / "cifar100_table.csv", index=False)
    md = _markdown(result)
    header = (
        f"CIFAR-100, RepDistiller's protocol, seeds {a.seeds}, teachers "
        + (f"from {a.teachers}" if a.teachers else "trained here (240 epochs, cached)")
        + f"; extra overrides: {' '.join(a.extra) or 'none'}\n"
        + "ours: mean ± std over seeds; 'best epoch' is the epoch of highest test accuracy (a test-set selection, optimistic).\n"
        + f"published: {PUBLISHED['_source']['RepDistiller']}; dkd: {PUBLISHED['_source']['mdistiller']}.\n"
    )
    (out / "cifar100_table.md").write_text(header + "\n" + md + "\n")
    print("\n" + header + "\n" + md)
    bad = df[df["status"] != "ok"] if "status" in df else df
    print(f"\nwall {wall:.0f} s; {len(df) - len(bad)} runs ok, {len(bad)} failed; runs and table under {out}")
    if failed or len(bad) or result.empty:
        raise SystemExit("[bench-cifar100] some jobs failed; see above")


if __name__ == "__main__":
    main()
