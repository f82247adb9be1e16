"""make bench-methods: which distillation methods help, each tuned the same way, on MNIST-1D.

Tuned (the default). For every method, Optuna (TPE, `--trials` trials, the same for every method; the first
`--startup` are random) picks the
main term's weight (log scale, a tenth to ten times the config's) and its temperature where it has one
(1 to 8), maximising the validation accuracy of one run at tuning seed 100; the CE-only baseline gets the
same number of trials over its learning rate (3e-4 to 3e-2), and every method then trains at the learning
rate chosen for CE alone (the baseline's recipe, as in the papers; `--lr` when CE alone is not run). A trial
that diverges counts as a failed trial of the same budget; a reported seed that diverges is named in its row. Then
`--seeds` (5) runs at the chosen setting, reported as test accuracy mean ± std and the gain over CE alone
with a 95 % Welch interval. Single-teacher methods learn from cnn_b of the mnist1d_pool; multi-teacher
methods (and KD, DKD, the feature term in their combine modes) from cnn_a + cnn_b + cnn_c, against KD from
cnn_b alone tuned the same way. Student: cnn1d [8, 8, 8], 30 epochs (our choices, so that map methods apply).
The table goes to OUT/tables.md, the plot of the gains to OUT/gains.png.
Untuned (`--untuned`): the configs' own settings, 3 seeds, one multirun per method group.

Usage: python bench/methods.py [--trials 8] [--startup 4] [--seeds 0,1,2,3,4] [--epochs 30] [--jobs 2]
       [--methods none,kd,...] [--multi kd_mean,camkd,...] [--into an earlier run's folder, to finish it]
       [--lr 0.003: only when CE alone is not among --methods]
       python bench/methods.py --untuned [--seeds 0,1,2] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multirun import finished, mark_finished, run_quietly  # noqa: E402

from kd_lightning.analysis.stats import collect, gain_interval, summarize, to_markdown  # noqa: E402

TUNED = "none,kd,fitnet,at,sp,rkd,pkt,nst,cc,dkd,crd,vid,dist,kd_ls,dkd_ls,ickd,ft,srd,ab,reviewkd"
# multi-teacher rows: label → (distill config, extra overrides)
MULTI = {
    "kd_mean": ("kd", ["distill.terms.kd.combine=mean"]),  # KL to the teachers' mean logits
    "kd_per_teacher": ("kd", ["distill.terms.kd.combine=per_teacher"]),  # mean of per-teacher KLs
    "dkd_mean": ("dkd", ["distill.terms.dkd.combine=mean"]),
    "dkd_per_teacher": ("dkd", ["distill.terms.dkd.combine=per_teacher"]),
    "camkd": ("camkd", []),
    "aekd": ("aekd", []),
    "feature_concat": ("landro2021", []),  # the teachers' penultimate features concatenated, one adapter
    "feature_gate": ("landro2021", ["distill.terms.feat.combine=gate"]),  # per-sample learned teacher weights
}
PAPERS = {
    "none": "student alone (CE)",
    "kd": "Hinton et al. 2015",
    "fitnet": "Romero et al. 2015",
    "at": "Zagoruyko & Komodakis 2017",
    "sp": "Tung & Mori 2019",
    "rkd": "Park et al. 2019",
    "pkt": "Passalis & Tefas 2018",
    "nst": "Huang & Wang 2017",
    "cc": "Peng et al. 2019",
    "dkd": "Zhao et al. 2022",
    "crd": "Tian et al. 2020",
    "vid": "Ahn et al. 2019",
    "dist": "Huang et al. 2022",
    "kd_ls": "Sun et al. 2024",
    "dkd_ls": "Sun et al. 2024",
    "ickd": "Liu et al. 2021",
    "ft": "Kim et al. 2018",
    "srd": "Miles & Mikolajczyk 2024",
    "ab": "Heo et al. 2019",
    "reviewkd": "Chen et al. 2021",
    "camkd": "Zhang et al. 2022",
    "aekd": "Du et al. 2020",
}
COMMON = [
    "data=mnist1d", "teachers=mnist1d_pool", "student=cnn1d", "student.channels=[8,8,8]",
    "trainer.enable_progress_bar=false", "print_summary=false", "logger=none",
]  # fmt: skip
TUNING_SEED = 100  # tuning runs use their own seed: the reported seeds do not choose their own setting


# Per-method settings for this small CPU job: CRD's 4096 negatives (16384 in the paper, for 50k images)
# cost more than the rest of the step here; 512 of 7,200 samples keeps the same order of K / N.
METHOD_OVERRIDES = {
    "crd": ["distill.terms.crd.nce_k=512"],
    # FT's pre-stage: RepDistiller trains the paraphraser 30 epochs before 240; 5 before our 30 keeps the ratio
    "ft": ["distill.terms.ft.init_epochs=5"],
    "ab": ["distill.terms.ab.init_epochs=5"],  # AB's pre-stage, the same ratio
}


def search_space(method: str) -> dict[str, str]:
    """Optuna's overrides: the first term's weight (log, ×0.1 to ×10) and its temperature where it has one;
    the learning rate for CE alone."""
    from omegaconf import OmegaConf

    if method == "none":
        return {"optim.lr": "tag(log,interval(0.0003,0.03))"}
    terms = OmegaConf.load(ROOT / "conf" / "distill" / f"{method}.yaml").terms
    name = next(iter(terms))
    w = float(terms[name].weight)
    space = {f"distill.terms.{name}.weight": f"tag(log,interval({w / 10:g},{w * 10:g}))"}
    if "temperature" in terms[name]:
        space[f"distill.terms.{name}.temperature"] = "interval(1.0,8.0)"
    return space


def _kd_train(overrides: list[str], folder: Path, jobs: int, diverged_ok: bool = False) -> bool:
    """One kd-train multirun. With `diverged_ok`, a multirun whose failed jobs all stopped on a non-finite
    loss still counts as finished: those seeds are reported as diverged, not dropped silently."""
    if finished(folder):
        print(f"[bench-methods]   reusing the finished runs in {folder}", flush=True)
        return True
    cmd = [sys.executable, "-m", "kd_lightning.train", "-m", *overrides, "hydra/launcher=local",
           f"hydra.launcher.n_jobs={jobs}", f"hydra.sweep.dir={folder}"]  # fmt: skip
    ok = run_quietly(cmd, "bench-methods") == 0
    if not ok and diverged_ok:
        runs = _results(folder)
        ok = bool(runs) and all(r.get("status") == "ok" or _diverged(r) for r in runs)
    if ok:
        mark_finished(folder)
    return ok


def _diverged(result: dict[str, Any]) -> bool:
    return result.get("status") == "failed" and "FloatingPointError" in str(result.get("error", ""))


def _results(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("results.json"))]


def tune_and_run(
    label: str, method: str, extra: list[str], base: list[str], a: argparse.Namespace, out: Path
):
    """Optuna over the method's search space at the tuning seed, then the reported seeds at its best setting."""
    import yaml

    space = search_space(method)
    common = [*COMMON, *base, f"distill={method}", *extra, f"trainer.max_epochs={a.epochs}"]
    lr = [] if method == "none" else [f"optim.lr={a.lr}"]
    tune = out / label / "tune"
    # max_failure_rate=1: a trial that diverges is a failed trial (of the same budget), not the end of the study
    sweeper = ["hydra/sweeper=optuna", "hydra/sweeper/sampler=tpe", "hydra.sweeper.direction=maximize",
               "hydra.sweeper.max_failure_rate=1.0",
               f"hydra.sweeper.n_trials={a.trials}", f"hydra.sweeper.n_jobs={a.jobs}",
               "hydra.sweeper.sampler.seed=1234", f"hydra.sweeper.sampler.n_startup_trials={a.startup}",
               f"hydra.sweeper.study_name=bench_{label}"]  # fmt: skip
    if not _kd_train(
        [*common, *lr, *sweeper, f"seed={TUNING_SEED}", *[f"{k}={v}" for k, v in space.items()]], tune, a.jobs
    ):
        return None
    best = yaml.safe_load((tune / "optimization_results.yaml").read_text())
    chosen = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["best_params"].items()]
    final = out / label / "seeds"
    if not _kd_train([*common, *lr, *chosen, f"seed={a.seeds}"], final, a.jobs, diverged_ok=True):
        return None
    runs = [r for r in _results(final) if r.get("status") == "ok"]
    diverged = sorted(int(r["seed"]) for r in _results(final) if _diverged(r))
    return {"label": label, "method": method, "chosen": [*lr, *chosen], "val": float(best["best_value"]),
            "test": [float(r["test_acc"]) for r in runs], "diverged": diverged,
            "teachers": {k: v for r in runs[:1] for k, v in r.get("teacher_test_acc", {}).items()}}  # fmt: skip


def _row(r: dict, ref: dict | None) -> str:
    import statistics

    t = r["test"]
    gain = "—"
    if ref is not None and r is not ref:
        d, h = gain_interval(t, ref["test"])
        gain = f"{100 * d:+.2f} [{100 * (d - h):+.2f}, {100 * (d + h):+.2f}]"
    setting = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in (c.split("=", 1) for c in r["chosen"]))
    n = f"{len(t)}" + (f" (seed {', '.join(map(str, r['diverged']))} diverged)" if r.get("diverged") else "")
    return (f"| {r['label']} | {PAPERS.get(r['method'], '')} | {setting} | {100 * r['val']:.2f} | "
            f"{100 * statistics.mean(t):.2f} ± {100 * statistics.stdev(t) if len(t) > 1 else 0:.2f} | {n} | {gain} |")  # fmt: skip


def plot(single: list[dict], multi: list[dict], kd_single: dict | None, path: Path) -> None:
    """Each row's gain with its 95 % interval: single-teacher methods over CE alone, multi-teacher rows
    over KD from cnn_b alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next((r for r in single if r["method"] == "none"), None)
    panels = [(p, ref_, title) for p, ref_, title in ((single, ref, "single teacher (cnn_b) − CE alone"),
              (multi, kd_single, "three teachers − KD from cnn_b")) if ref_ is not None and p]  # fmt: skip
    if not panels:
        return
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.5 * len(panels), 0.3 * max(len(p) for p, _, _ in panels) + 1.5)
    )
    for ax, (rows, ref_, title) in zip(axes if len(panels) > 1 else [axes], panels, strict=True):
        rows = [r for r in rows if r is not ref_]
        gains = [gain_interval(r["test"], ref_["test"]) for r in rows]
        y = list(range(len(rows)))
        ax.errorbar([100 * d for d, _ in gains], y, xerr=[100 * h for _, h in gains], fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y, [r["label"] for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy gain (points), 95 % CI")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tuned(a: argparse.Namespace) -> None:
    out = Path(a.into) if a.into else Path(a.out) / time.strftime("%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    head = ["| method | paper | chosen on validation | val acc (%) | test acc (%) | n | minus {ref} (pts) [95 % CI] |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    single, lines = [], [f"MNIST-1D, student cnn1d [8, 8, 8], {a.epochs} epochs; Optuna TPE, {a.trials} trials per "
                         f"method ({a.startup} random, then TPE) at seed {TUNING_SEED}, then seeds {a.seeds}", "",
                         "Single teacher (cnn_b):", "", *[h.replace("{ref}", "CE alone") for h in head]]  # fmt: skip
    failed = []
    methods = [x for x in a.methods.split(",") if x]
    for m in sorted(
        methods, key=lambda m: m != "none"
    ):  # CE alone first: the others train at its learning rate
        r = tune_and_run(m, m, METHOD_OVERRIDES.get(m, []), ["teachers.use=[cnn_b]"], a, out)
        (single.append(r) if r else failed.append(m))
        if m == "none" and r:
            a.lr = next(c.split("=", 1)[1] for c in r["chosen"] if c.startswith("optim.lr="))
        elif m == "none":
            raise SystemExit("[bench-methods] CE alone failed: the other methods need its learning rate")
    ref = next((r for r in single if r["method"] == "none"), None)
    lines += [_row(r, ref) for r in single]
    if single and single[0]["teachers"]:
        lines.append(
            f"\nteacher cnn_b: {100 * single[0]['teachers'].get('cnn_b', float('nan')):.2f} % test accuracy"
        )
    multi = []
    kd_single = next((r for r in single if r["method"] == "kd"), None)
    for label in [x for x in a.multi.split(",") if x]:
        method, extra = MULTI[label]
        r = tune_and_run(label, method, extra, ["teachers.use=[cnn_a,cnn_b,cnn_c]"], a, out)
        (multi.append(r) if r else failed.append(label))
    if multi:
        lines += ["", "Three teachers (cnn_a + cnn_b + cnn_c):", "",
                  *[h.replace("{ref}", "KD from cnn_b alone") for h in head], *[_row(r, kd_single) for r in multi]]  # fmt: skip
        if multi[0]["teachers"]:
            lines.append(
                "\nteachers: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in multi[0]["teachers"].items())
            )
    plot(single, multi, kd_single, out / "gains.png")
    lines.append(f"\nwall {time.perf_counter() - t0:.0f} s; runs under {out}; plot {out / 'gains.png'}")
    text = "\n".join(lines)
    print("\n" + text)
    (out / "tables.md").write_text(text + "\n")
    if failed:
        raise SystemExit(f"[bench-methods] failed: {failed}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--untuned", action="store_true", help="the configs' own settings, no tuning")
    p.add_argument("--seeds", default=None, help="reported seeds (tuned: 0,1,2,3,4; untuned: 0,1,2)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--trials", type=int, default=8, help="Optuna trials per method (tuned)")
    p.add_argument("--startup", type=int, default=4, help="of those, random trials before TPE takes over")
    p.add_argument("--methods", default=None, help=f"single-teacher methods (default: {TUNED})")
    p.add_argument(
        "--multi", default=",".join(MULTI), help="multi-teacher rows (tuned), of: " + ", ".join(MULTI)
    )
    p.add_argument("--lr", default="0.003", help="the methods' learning rate when CE alone is not run")
    p.add_argument("--into", help="an earlier tuned run's folder: its finished multiruns are reused")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "methods"))
    a = p.parse_args()
    unknown = [m for m in a.multi.split(",") if m and m not in MULTI]
    if unknown:
        raise SystemExit(f"--multi: unknown row(s) {unknown}; valid: {', '.join(MULTI)}")
    a.seeds = a.seeds or ("0,1,2" if a.untuned else "0,1,2,3,4")
    a.methods = a.methods if a.methods is not None else TUNED
    if a.untuned:
        untuned(a)
    else:
        tuned(a)


def untuned(a: argparse.Namespace) -> None:
    out = Path(a.out) / time.strftime("%Y%m%d-%H%M%S")
    methods = a.methods.split(",")
    groups = [[m for m in methods if m not in METHOD_OVERRIDES]] + [
        [m] for m in methods if m in METHOD_OVERRIDES
    ]
    t0 = time.perf_counter()
    failed = False
    for group in [g for g in groups if g]:
        extra = [o for m in group for o in METHOD_OVERRIDES.get(m, [])]
        cmd = [
            sys.executable, "-m", "kd_lightning.train", "-m", *COMMON, "teachers.use=[cnn_b]",
            f"distill={','.join(group)}", *extra, f"seed={a.seeds}", f"trainer.max_epochs={a.epochs}",
            "optim.lr=0.003", "hydra/launcher=local", f"hydra.launcher.n_jobs={a.jobs}", f"hydra.sweep.dir={out / '_'.join(group)}",
        ]  # fmt: skip
        failed |= run_quietly(cmd, "bench-methods") != 0
    wall = time.perf_counter() - t0
    df = collect(out)
    table = summarize(df, ["distill"])
    base = table.set_index("distill")["mean"].get("none")
    print(
        f"\nMNIST-1D, cnn1d[8,8,8] student ← cnn1d[64,64,64] teacher (cnn_b), {a.epochs} epochs, seeds {a.seeds}"
    )
    teacher = df.get("teacher_acc/cnn_b")
    if teacher is not None:
        print(f"teacher cnn_b test acc: {100 * teacher.dropna().mean():.2f}%")
    print("\n| method | paper | student test acc (%) mean ± std | n | vs CE alone (pts) |")
    print("|---|---|---|---|---|")
    for _, r in table.iterrows():
        gain = "—" if r["distill"] == "none" or base is None else f"{100 * (r['mean'] - base):+.2f}"
        print(
            f"| {r['distill']} | {PAPERS.get(r['distill'], '')} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} "
            f"| {int(r['n'])} | {gain} |"
        )
    print(f"\nwall {wall:.0f} s; runs under {out}")
    print("\n" + to_markdown(table))
    if failed:
        raise SystemExit("[bench-methods] some jobs failed; see the table's failed column")


if __name__ == "__main__":
    main()
