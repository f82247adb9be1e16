"""make bench-papers: the paper reproductions of docs/REPRODUCTIONS.md, over seeds, mean ± std.

Every setting is a real `kd-train -m` multirun (jobs in parallel processes); this script only reads what
the runs wrote (results.json, metrics.csv, student.pt, robustness.csv) and prints one table per paper.
Plots go to OUT/<paper>/*.png. Teachers and pre-trained models are fitted on first use and cached.
Usage: python bench/papers.py [--seeds 0,1,2] [--teacher-seeds 0,1,2] [--only rahbar2020,thapa2022,ye2019,landro2021]
       [--jobs 2] [--into an earlier run's folder, to finish it] [-- overrides added to every run]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multirun import finished, folder_for, mark_finished, pts, run_quietly  # noqa: E402

QUIET = ["trainer.enable_progress_bar=false", "print_summary=false"]
EXTRA: list[str] = []  # overrides after `--`, added to every run (a quick check: -- trainer.max_epochs=2)


def multirun(
    folder: Path, overrides: Sequence[str], seeds: str, jobs: int, logger: str = "none"
) -> list[dict]:
    """One Hydra multirun of kd-train; returns every job's results.json (with its folder as `run_dir`)."""
    if not finished(folder):
        _launch(folder, overrides, seeds, jobs, logger)
    else:
        print(f"[bench-papers]   reusing the finished runs in {folder}", flush=True)
    runs = []
    for path in sorted(folder.rglob("results.json")):
        r = json.loads(path.read_text())
        r["run_dir"] = str(path.parent)
        runs.append(r)
    bad = [r["run_dir"] for r in runs if r.get("status") != "ok"]
    if bad:
        raise SystemExit(f"[bench-papers] runs did not finish: {bad}")
    return runs


def _launch(folder: Path, overrides: Sequence[str], seeds: str, jobs: int, logger: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "kd_lightning.train",
        "-m",
        *overrides,
        *QUIET,
        *EXTRA,
        f"logger={logger}",
        f"seed={seeds}",
        "hydra/launcher=local",
        f"hydra.launcher.n_jobs={jobs}",
        f"hydra.sweep.dir={folder}",
    ]
    t0 = time.perf_counter()
    code = run_quietly(cmd, "bench-papers", "kd-train " + " ".join(cmd[3:]))
    if code != 0:
        raise SystemExit(f"[bench-papers] multirun into {folder} failed (exit {code})")
    print(f"[bench-papers]   multirun took {time.perf_counter() - t0:.0f}s", flush=True)
    runs = [json.loads(p.read_text()) for p in folder.rglob("results.json")]
    if runs and all(r.get("status") == "ok" for r in runs):
        mark_finished(folder)


def ms(values: Iterable[float], scale: float = 100.0, digits: int = 2) -> str:
    v = [scale * x for x in values if x is not None]
    if not v:
        return "—"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f}"


def by(runs: list[dict], key: Callable[[dict], Any]) -> dict[Any, list[dict]]:
    out: dict[Any, list[dict]] = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- Rahbar et al. 2020 ----------------------------------------------------------------------------
RHOS = "0,0.25,0.5,0.75,1"
WIDTHS = "16,64,256,1024,4096"
TEACHER_WIDTH = 64


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _train_loss_curve(run_dir: str) -> list[float]:
    rows = _read_csv(next(Path(run_dir).rglob("metrics.csv")))
    per_epoch: dict[int, float] = {}
    for r in rows:
        if r.get("train/loss"):
            per_epoch[int(r["epoch"])] = float(r["train/loss"])
    return [per_epoch[e] for e in sorted(per_epoch)]


def _rahbar_analysis(run: dict) -> dict[str, Any]:
    """Where the student converged on its training set, relative to the labels Y and the teacher's P."""
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from kd_lightning.data.from_config import instantiate_datamodule
    from kd_lightning.models import load_model

    cfg = OmegaConf.load(Path(run["run_dir"]) / "config.resolved.yaml")
    dm = instantiate_datamodule(cfg.data)
    dm.setup("fit")
    x = torch.cat([dm.prepare_batch(b, train=False).x for b in dm.iter_split("train")])
    train_y = dm.labels("train")
    student = load_model(Path(run["run_dir"]) / "student.pt").eval()
    teacher = load_model(next(iter(run["teacher_checkpoints"].values()))).eval()
    with torch.no_grad():
        f = student(x)
        p = F.softmax(teacher(x), 1)
    y = F.one_hot(train_y, p.shape[1]).float()
    rho = float(cfg.distill.rho)
    d = p - y
    alpha = float(((f - y) * d).sum() / (d * d).sum())  # f ≈ y + α(p − y): α = ρ when it interpolates
    residual = float((f - y - alpha * d).norm() / d.norm())
    loss_min = float(rho * (1 - rho) * (d * d).mean())  # the mixed objective's minimum (f = ρp + (1−ρ)y)
    curve = _train_loss_curve(run["run_dir"])
    excess = [(v - loss_min) / max(curve[0] - loss_min, 1e-12) for v in curve]
    steps = {tol: next((i for i, e in enumerate(excess) if e <= tol), None) for tol in (0.1, 0.01)}
    train_err = float((f.argmax(1) != train_y).float().mean())
    extra = _kernel_comparison(dm, x, student, y, p, rho) if cfg.student.get("fixed_output") else {}
    return {
        **extra,
        "teacher_fit_seed": run.get("teacher_fit_seed", 0),
        "rho": rho,
        "width": int(cfg.student.width),
        "alpha": alpha,
        "residual": residual,
        "excess": excess,
        "steps_10": steps[0.1],
        "steps_1": steps[0.01],
        "train_err": train_err,
        "test_err": 1 - run["test_acc"],
        "teacher_test_err": 1 - next(iter(run["teacher_test_acc"].values())),
    }


def _inputs(dm, split: str):
    import torch

    return torch.cat([dm.prepare_batch(b, train=False).x for b in dm.iter_split(split)])


def _kernel_comparison(dm, x, student, y, p, rho: float) -> dict[str, Any]:
    """The theory's prediction for the analysed setting (fixed ±1 outputs, first layer trained by GD from
    f_0 = 0): kernel regression of the ρ-mixed targets with the infinite-width tangent kernel."""
    import torch

    from kd_lightning.evaluation.kernel import kernel_regression, relu_first_layer_ntk

    xt = _inputs(dm, "test")  # x: the training inputs the caller already read
    test_y = dm.labels("test")
    k, kt = relu_first_layer_ntk(x, x), relu_first_layer_ntk(xt, x)
    predicted = kernel_regression(k, kt, rho * p + (1 - rho) * y)
    with torch.no_grad():
        f = student(xt).double()
    return {
        "kernel_test_err": float((predicted.argmax(1) != test_y).float().mean()),
        "kernel_distance": float((f - predicted).norm() / predicted.norm()),
        "kernel_agreement": float((f.argmax(1) == predicted.argmax(1)).float().mean()),
    }


RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _labels_only_ridge(run: dict) -> dict[str, float]:
    """Labels-only baselines with the same kernel: the interpolant, and kernel ridge regression with its ridge
    chosen on the validation split (a regularised control for the ρ = 0 student, which interpolates)."""
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from kd_lightning.data.from_config import instantiate_datamodule
    from kd_lightning.evaluation.kernel import kernel_regression, relu_first_layer_ntk

    dm = instantiate_datamodule(OmegaConf.load(Path(run["run_dir"]) / "config.resolved.yaml").data)
    dm.setup("fit")
    x, xv, xt = _inputs(dm, "train"), _inputs(dm, "val"), _inputs(dm, "test")
    y = F.one_hot(dm.labels("train")).double()
    k, kv, kt = relu_first_layer_ntk(x, x), relu_first_layer_ntk(xv, x), relu_first_layer_ntk(xt, x)

    def err(kq, labels, ridge):
        return float((kernel_regression(k, kq, y, ridge).argmax(1) != labels).float().mean())

    val = {r: err(kv, dm.labels("val"), r) for r in RIDGES}
    best = min(val, key=lambda r: (val[r], -r))  # ties: the larger ridge
    return {
        "ridge": best,
        "ridge_test_err": err(kt, dm.labels("test"), best),
        "interp_test_err": err(kt, dm.labels("test"), 0.0),
    }


def rahbar2020(out: Path, seeds: str, jobs: int, teacher_seeds: str) -> str:
    base = ["experiment=rahbar2020"]
    runs = multirun(out / "rho", [*base, f"distill.rho={RHOS}"], seeds, jobs, logger="csv")
    runs += multirun(
        out / "width",
        [*base, "distill.rho=0,1", f"student.width={WIDTHS.replace(',4096', '')}"],
        seeds,
        jobs,
        "csv",
    )
    rows = [_rahbar_analysis(r) for r in runs]
    plt = _plt()
    lines = []

    at_full = [r for r in rows if r["width"] == 4096]
    lines += [
        "Rahbar et al. 2020 (a, b): student width 4096 (NTK), 600 full-batch steps; α = where the student's training"
        " outputs sit on the line from the labels (0) to the teacher's outputs (1); steps = until the excess loss"
        " (L − L*)/(L0 − L*) is ≤ 10 % / ≤ 1 %",
        "",
        "| ρ | α (expected ρ) | off-line residual | steps to 10 % | steps to 1 % | train err (%) | test err (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for rho, group in sorted(by(at_full, lambda r: r["rho"]).items()):
        s1 = [r["steps_1"] for r in group]
        lines.append(
            f"| {rho:g} | {ms([r['alpha'] for r in group], 1, 3)} | {ms([r['residual'] for r in group], 1, 3)} "
            f"| {ms([r['steps_10'] for r in group], 1, 1)} "
            f"| {ms(s1, 1, 1) if None not in s1 else 'not reached: ' + str(s1)} "
            f"| {ms([r['train_err'] for r in group])} | {ms([r['test_err'] for r in group])} |"
        )
    teacher_err = statistics.mean(r["teacher_test_err"] for r in rows)
    lines += ["", f"teacher (2-layer MLP, width {TEACHER_WIDTH}) test error: {100 * teacher_err:.2f} %", ""]

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    groups = sorted(by(at_full, lambda r: r["rho"]).items())
    a1.plot([0, 1], [0, 1], "k--", lw=1, label="α = ρ (interpolation)")
    a1.errorbar(
        [g for g, _ in groups],
        [statistics.mean(r["alpha"] for r in grp) for _, grp in groups],
        yerr=[statistics.pstdev([r["alpha"] for r in grp]) for _, grp in groups],
        marker="o",
        label="student",
    )
    a1.set_xlabel("ρ"), a1.set_ylabel("α: labels (0) → teacher (1)"), a1.legend(fontsize=8)
    for rho, grp in groups:
        curve = [statistics.mean(vals) for vals in zip(*[r["excess"] for r in grp], strict=False)]
        a2.semilogy([max(c, 1e-6) for c in curve], label=f"ρ={rho:g}")
    a2.set_xlabel("gradient step"), a2.set_ylabel("(L − L*) / (L0 − L*)"), a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rahbar2020_interpolation_convergence.png", dpi=110)
    plt.close(fig)

    lines += [
        "Rahbar et al. 2020 (c): student width vs the teacher's (64), 600 steps",
        "",
        "| width | width / teacher | ρ | train err (%) | test err (%) |",
        "|---|---|---|---|---|",
    ]
    wr = [r for r in rows if r["rho"] in (0.0, 1.0)]
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for rho, grp in sorted(by(wr, lambda r: r["rho"]).items()):
        pts = sorted(by(grp, lambda r: r["width"]).items())
        for w, g in pts:
            lines.append(
                f"| {w} | {w / TEACHER_WIDTH:g} | {rho:g} | {ms([r['train_err'] for r in g])} | {ms([r['test_err'] for r in g])} |"
            )
        ax.errorbar(
            [w / TEACHER_WIDTH for w, _ in pts],
            [100 * statistics.mean(r["test_err"] for r in g) for _, g in pts],
            yerr=[100 * statistics.pstdev([r["test_err"] for r in g]) for _, g in pts],
            marker="o",
            label=f"ρ={rho:g} ({'teacher only' if rho else 'labels only'})",
        )
    ax.axhline(100 * teacher_err, color="k", ls="--", lw=1, label="teacher")
    ax.set_xscale("log"), ax.set_xlabel("student width / teacher width"), ax.set_ylabel("test error (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rahbar2020_width.png", dpi=110)
    plt.close(fig)
    return "\n".join(lines + [""] + _rahbar_analysed(out, seeds, jobs, teacher_seeds))


def _rahbar_analysed(out: Path, seeds: str, jobs: int, teacher_seeds: str) -> list[str]:
    runs = multirun(
        out / "fixed_output",
        ["experiment=rahbar2020_fixed_output", "distill.rho=0,0.5,1", f"teachers.fit_seed={teacher_seeds}"],
        seeds,
        jobs,
        logger="csv",
    )
    rows = [_rahbar_analysis(r) for r in runs]
    lines = [
        "Rahbar et al. 2020, the analysed setting (experiment=rahbar2020_fixed_output): width 4096, output weights"
        " fixed at ±1, first layer trained, plain gradient descent (lr 80, 1000 full-batch steps); teacher fits"
        f" {teacher_seeds} × student seeds {seeds}. Kernel regression = the infinite-width tangent kernel's"
        " interpolant of the ρ-mixed targets (the theory's prediction for this student).",
        "",
        "| ρ | n | α (expected ρ) | train err (%) | test err (%) | kernel regression test err (%) "
        "| ‖f − f_kernel‖ / ‖f_kernel‖ on test | top-1 agreement with kernel regression (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rho, g in sorted(by(rows, lambda r: r["rho"]).items()):
        lines.append(
            f"| {rho:g} | {len(g)} | {ms([r['alpha'] for r in g], 1, 3)} | {ms([r['train_err'] for r in g])} "
            f"| {ms([r['test_err'] for r in g])} | {ms([r['kernel_test_err'] for r in g])} "
            f"| {ms([r['kernel_distance'] for r in g], 1, 3)} | {ms([r['kernel_agreement'] for r in g])} |"
        )
    from kd_lightning.analysis.stats import gain_interval

    err = {rho: [r["test_err"] for r in g] for rho, g in by(rows, lambda r: r["rho"]).items()}
    diff, half = gain_interval(err[0.0], err[1.0])
    base = _labels_only_ridge(runs[0])
    teacher = [g[0]["teacher_test_err"] for g in by(rows, lambda r: r["teacher_fit_seed"]).values()]
    lines += [
        "",
        f"test error, labels only (ρ 0) minus teacher only (ρ 1): {pts(diff, half)} pts (95 % Welch)",
        f"labels only, kernel interpolation (closed form): {100 * base['interp_test_err']:.2f} % test error",
        f"labels only, kernel ridge regression, ridge {base['ridge']:g} chosen on the validation split: "
        f"{100 * base['ridge_test_err']:.2f} % test error",
        f"teacher over its fits: {ms(teacher)} % test error",
    ]
    return lines


# --- Thapa 2022 ------------------------------------------------------------------------------------
THAPA = {
    "from scratch": ["experiment=thapa2022", "distill=none", "student.pretrained=null"],
    "KD without transfer": ["experiment=thapa2022", "student.pretrained=null"],
    "TL": ["experiment=thapa2022", "distill=none"],
    "TL+KD": ["experiment=thapa2022"],
}
LABELS = "50,100,250,1000"
CORRUPTIONS = ("gaussian_noise", "blur", "contrast", "pixel_dropout")


def _relative(r: dict) -> float:
    """Robustness relative to clean accuracy: mean corrupted accuracy / clean accuracy."""
    return r["robustness"]["student"] / r["metrics"]["student"]["acc"]


def thapa2022(out: Path, seeds: str, jobs: int, teacher_seeds: str) -> str:
    from kd_lightning.analysis.stats import paired_interval

    fits = f"teachers.fit_seed={teacher_seeds}"
    lines = [
        "Thapa 2022: MNIST-1D, source digits 0-4 → target digits 5-9 with 250 labelled samples, drawn anew"
        " for each student seed (data.split_seed = seed; the teacher is fine-tuned on the same samples);"
        f" teacher fine-tune seeds {teacher_seeds} × student seeds {seeds} (rows without KD: the first teacher"
        " seed only, since their student does not depend on it); cnn1d[16,16,16] student,"
        " cnn1d[128,128,128] teacher (both pre-trained on the source); corrupted = mean test accuracy over"
        " severities 1-5; relative = corrupted / clean",
        "",
        "| setting | n | acc (%) | macro F1 (%) | ECE | agreement w/ teacher (%) | noise | blur | contrast "
        "| dropout | mean corrupted | relative (corrupted / clean, %) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    curves: dict[str, dict[tuple[str, int], list[float]]] = {}
    by_label: dict[str, list[dict]] = {}
    for label, overrides in THAPA.items():
        # without KD the student does not depend on the teacher's fit: one fit (its agreement), no duplicates
        axis = fits.split(",")[0] if "distill=none" in overrides else fits
        runs = multirun(out / folder_for(label), [*overrides, axis], seeds, jobs)
        runs = [r for r in runs if axis == fits or r["teacher_fit_seed"] == int(axis.split("=")[1])]
        by_label[label] = runs
        per_corr: dict[str, list[float]] = {}
        for r in runs:
            rows = _read_csv(Path(r["run_dir"]) / "robustness.csv")
            for row in rows:
                key = (row["corruption"], int(row["severity"]))
                model = "student" if row["model"] == "student" else "teacher"
                curves.setdefault(label if model == "student" else "teacher", {}).setdefault(key, []).append(
                    float(row["acc"])
                )
            summary = {}
            for row in rows:
                if row["model"] == "student" and int(row["severity"]) > 0:
                    summary.setdefault(row["corruption"], []).append(float(row["acc"]))
            for c, v in summary.items():
                per_corr.setdefault(c, []).append(statistics.mean(v))
        st = [r["metrics"]["student"] for r in runs]
        cells = [ms(per_corr[c]) for c in CORRUPTIONS]
        lines.append(
            f"| {label} | {len(runs)} | {ms([m['acc'] for m in st])} | {ms([m['macro_f1'] for m in st])} "
            f"| {ms([m['ece'] for m in st], 1, 4)} | {ms([r['agreement']['student'] for r in runs])} "
            f"| {' | '.join(cells)} | {ms([r['robustness']['student'] for r in runs])} "
            f"| {ms([_relative(r) for r in runs])} |"
        )
    teachers = [r["metrics"]["cnn_l"] for r in by_label["TL+KD"] if r["metrics"].get("cnn_l")]
    if teachers:
        lines.append(
            f"| teacher cnn_l (fine-tuned) | {len(teachers)} | {ms([t['acc'] for t in teachers])} "
            f"| {ms([t['macro_f1'] for t in teachers])} | {ms([t['ece'] for t in teachers], 1, 4)} | — | | | | | | |"
        )

    def gap(x: str, y: str, key: Callable[[dict], float]) -> str:
        # paired by student seed: the same seed draws the same labelled subset and the same initial student in
        # both rows; a row's runs of one seed (its teacher fits) are averaged first
        pairs = [
            [statistics.mean(key(r) for r in by_label[row] if r["seed"] == s) for row in (x, y)]
            for s in sorted({r["seed"] for r in by_label[x]})
        ]
        d, h = paired_interval([a for a, _ in pairs], [b for _, b in pairs])
        return pts(d, h)

    acc = lambda r: r["metrics"]["student"]["acc"]  # noqa: E731
    lines += ["", "differences in points [95 % t interval, paired by labelled subset (student seed)]:", ""]
    for x, y in (("TL+KD", "TL"), ("KD without transfer", "from scratch"), ("TL", "KD without transfer")):
        lines.append(
            f"- {x} minus {y}: accuracy {gap(x, y, acc)}; mean corrupted "
            f"{gap(x, y, lambda r: r['robustness']['student'])}; relative {gap(x, y, _relative)}; "
            f"ECE {gap(x, y, lambda r: r['metrics']['student']['ece'])} (×100)"
        )

    sweep = multirun(
        out / "labels",
        # the first teacher fine-tune seed only: each student seed still draws its own labelled samples
        ["experiment=thapa2022", "distill=kd,none", f"data.train_subset={LABELS}", fits.split(",")[0]],
        seeds,
        jobs,
    )
    lines += [
        "",
        f"Number of target labels (data.train_subset), TL vs TL+KD; student seeds {seeds}, teacher fine-tune"
        f" seed {teacher_seeds.split(',')[0]}:",
        "",
        "| labels | TL acc (%) | TL+KD acc (%) | TL+KD minus TL (pts) [95 % CI, paired] | teacher acc (%) |",
        "|---|---|---|---|---|",
    ]
    groups = by(sweep, lambda r: (_labels_of(r), r["distill"]))
    for n in sorted({k[0] for k in groups}):
        tl, kd = (sorted(groups[(n, m)], key=lambda r: r["seed"]) for m in ("none", "kd"))
        d, h = paired_interval([acc(r) for r in kd], [acc(r) for r in tl])  # paired by labelled subset
        lines.append(
            f"| {n} | {ms([acc(r) for r in tl])} | {ms([acc(r) for r in kd])} "
            f"| {pts(d, h)} "
            f"| {ms([r['metrics']['cnn_l']['acc'] for r in kd])} |"
        )

    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    for ax, c in zip(axes, CORRUPTIONS, strict=True):
        for label, curve in curves.items():
            sev = sorted(s for cc, s in curve if cc == c)
            ax.plot(sev, [100 * statistics.mean(curve[(c, s)]) for s in sev], marker="o", label=label)
        ax.set_title(c), ax.set_xlabel("severity"), ax.set_ylabel("test accuracy (%)"), ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "thapa2022_robustness.png", dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def _labels_of(run: dict) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(Path(run["run_dir"]) / "config.resolved.yaml").data.train_subset)


# --- Ye et al. 2019 --------------------------------------------------------------------------------
# label → (overrides, whether it runs over every teacher fit seed or the first only)
YE = {
    "layer-wise + end-to-end KD stage (default)": (["experiment=ye2019"], True),
    "end-to-end KD only, no layer-wise stage": (
        # our choice: the 90 epochs the default schedule spends in total (3 × 20 + 15 + 15)
        [
            "experiment=ye2019",
            "amalgamation.block_epochs=0",
            "amalgamation.head_epochs=0",
            "amalgamation.finetune_epochs=90",
        ],
        False,
    ),
    "layer-wise only": (["experiment=ye2019", "amalgamation.finetune_epochs=0"], False),
    "layer-wise only, no channel filter": (
        ["experiment=ye2019", "amalgamation.finetune_epochs=0", "amalgamation.filter=none"],
        False,
    ),
    # closer to the authors' re-implementation (our reading): per-teacher channel attention, the student's
    # block run through each teacher's remaining layers and heads, then the heads and a whole-student fine-tune
    "entangled blocks (attention, teachers' remaining layers) + end-to-end KD stage": (
        ["experiment=ye2019", "amalgamation.block_stage=entangled"],
        True,
    ),
    # no teacher holds the digit task: teacher A's tasks no longer determine teacher B's, and the reverse
    "teacher A {parity, mod3} instead of {digit, parity}": (
        ["experiment=ye2019", "amalgamation.teachers.teacher_a.tasks=[parity,mod3]"],
        True,
    ),
}


def ye2019(out: Path, seeds: str, jobs: int, teacher_seeds: str) -> str:
    from kd_lightning.analysis.stats import paired_interval

    first = teacher_seeds.split(",")[0]
    lines = []
    tables: dict[str, list[dict]] = {}
    for i, (label, (overrides, all_fits)) in enumerate(YE.items()):
        fits = f"amalgamation.fit_seed={teacher_seeds if all_fits else first}"
        runs = multirun(out / f"variant{i}", [*overrides, fits], seeds, jobs)
        tables[label] = runs
        tasks = runs[0]["tasks"]
        if not lines:
            lines += [
                "Ye et al. 2019: MNIST-1D, teacher_a {digit, parity} and teacher_b {ge5, mod3} (cnn 64-64-64, labels),"
                f" student cnn 32-32-32 customised to {tasks}, no labels; student seeds {seeds}, teacher fit seeds"
                f" (amalgamation.fit_seed) {teacher_seeds} on the rows marked *, {first} on the others",
                "",
                "| student | n | "
                + " | ".join(f"{t} acc (%)" for t in tasks)
                + " | "
                + " | ".join(f"{t}: student minus its fit's teacher (pts) [95 % CI, paired]" for t in tasks)
                + " |",
                "|---|---|" + "---|" * (2 * len(tasks)),
            ]
        gaps = []
        for t in tasks:
            # each run against the teacher of its own fit that holds the task: paired by teacher fit (at one
            # fit the interval holds the students' variance only)
            mine = [next(per[t] for per in r["teacher_task_acc"].values() if t in per) for r in runs]
            d, h = paired_interval([r["task_acc"][t] for r in runs], mine)
            gaps.append(pts(d, h))
        lines.append(
            f"| {label}{' *' if all_fits else ''} | {len(runs)} | "
            + " | ".join(ms([r["task_acc"][t] for r in runs]) for t in tasks)
            + " | "
            + " | ".join(gaps)
            + " |"
        )
    for label in (next(iter(YE)), list(YE)[-1]):
        runs = tables[label]
        fits = [g[0] for g in by(runs, lambda r: r["teacher_fit_seed"]).values()]
        for n in fits[0]["teacher_task_acc"]:
            per = [f["teacher_task_acc"][n] for f in fits]
            lines.append(
                f"| teacher {n} {{{', '.join(per[0])}}} ({label.split(' (')[0]}; {len(fits)} fits) | {len(fits)} | "
                + " | ".join(ms([p[t] for p in per]) if t in per[0] else "—" for t in tasks)
                + " |" * (len(tasks) + 1)
            )
    named = lambda start: next(k for k in YE if k.startswith(start))  # noqa: E731
    lines += ["", "Paired differences between rows (the same teacher fit and student seed):"]
    for x, y in [
        (named("entangled"), named("layer-wise + end-to-end")),
        (named("end-to-end KD only"), named("layer-wise + end-to-end")),
        (named("layer-wise only"), named("layer-wise only, no channel filter")),
    ]:
        # pairs (teacher fit, student seed) that both rows ran: at one fit when either row ran one
        keyed = [{(r["teacher_fit_seed"], r["seed"]): r for r in tables[row]} for row in (x, y)]
        shared = sorted(set(keyed[0]) & set(keyed[1]))
        cells = []
        for t in tasks:
            d, h = paired_interval(*([k[p]["task_acc"][t] for p in shared] for k in keyed))
            cells.append(f"{t} {pts(d, h)}")
        lines.append(f"- {x} minus {y}: {', '.join(cells)} (n = {len(shared)})")
    return "\n".join(lines)


# --- Landro et al. 2021, second question ---------------------------------------------------------------
def landro2021(out: Path, seeds: str, jobs: int, teacher_seeds: str) -> str:
    from kd_lightning.analysis.stats import gain_interval

    fits = f"teachers.fit_seed={teacher_seeds}"
    base = "experiment=landro2021_student_beats_teacher"
    settings = {
        "student, KD from the ensemble": multirun(out / "kd", [base, fits], seeds, jobs),
        # our choice: the three teachers' penultimate features concatenated, one linear adapter, MSE, λ 30
        "student, feature combination (concat) + CE": multirun(
            out / "feat", [base, "distill=landro2021", fits], seeds, jobs
        ),
        "same student, labels only": multirun(
            out / "alone", [base, "teachers=none", "distill=none"], seeds, jobs
        ),
    }
    kd = settings["student, KD from the ensemble"]
    per_fit = [g[0] for g in by(kd, lambda r: r["teacher_fit_seed"]).values()]
    names = list(per_fit[0]["teacher_test_acc"])
    best = [max(f["teacher_test_acc"].values()) for f in per_fit]
    ensemble = [f["teacher_ensemble_test_acc"] for f in per_fit]
    lines = [
        "Landro et al. 2021 (can a student beat its teachers?): MNIST-1D, student cnn1d 64-64-64 (= the largest"
        f" teacher), teachers over fits {teacher_seeds} × student seeds {seeds}",
        "",
        "| model | n | test acc (%) | minus the best teacher of each fit (pts) [95 % CI] | minus the ensemble [95 % CI] |",
        "|---|---|---|---|---|",
    ]
    for label, runs in settings.items():
        acc = [r["test_acc"] for r in runs]
        cells = []
        for ref in (best, ensemble):
            cells.append(pts(*gain_interval(acc, ref)))
        lines.append(f"| {label} | {len(runs)} | {ms(acc)} | {cells[0]} | {cells[1]} |")
    for n in names:
        lines.append(
            f"| teacher {n} | {len(per_fit)} | {ms([f['teacher_test_acc'][n] for f in per_fit])} | | |"
        )
    lines.append(f"| best teacher of each fit | {len(best)} | {ms(best)} | | |")
    lines.append(f"| teacher ensemble (mean logits) | {len(ensemble)} | {ms(ensemble)} | | |")
    return "\n".join(lines)


PAPERS = {"rahbar2020": rahbar2020, "thapa2022": thapa2022, "ye2019": ye2019, "landro2021": landro2021}


def _sections(path: Path) -> dict[str, str]:
    """The tables of an earlier tables.md, by paper (`## <paper>  (N s)` headings)."""
    if not path.is_file():
        return {}
    out = {}
    for chunk in ("\n" + path.read_text()).split("\n## ")[1:]:
        name = chunk.split()[0]
        if name in PAPERS:
            out[name] = "## " + chunk.rstrip("\n") + "\n"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--only", default=",".join(PAPERS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--teacher-seeds", default="0,1,2", help="teachers.fit_seed values (teacher fits)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "papers"))
    p.add_argument("--into", help="the folder of an earlier invocation: its finished multiruns are reused")
    p.add_argument("extra", nargs="*", help="after --: overrides added to every kd-train run")
    a = p.parse_args()
    EXTRA.extend(a.extra)
    unknown = [x for x in a.only.split(",") if x not in PAPERS]
    if unknown:
        raise SystemExit(f"--only: unknown paper(s) {unknown}; valid: {', '.join(PAPERS)}")
    out = Path(a.into) if a.into else Path(a.out) / time.strftime("%Y%m%d-%H%M%S")
    tables = _sections(out / "tables.md")  # --into: the other papers' tables stay
    for name in a.only.split(","):
        t0 = time.perf_counter()
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        table = PAPERS[name](folder, a.seeds, a.jobs, a.teacher_seeds)
        tables[name] = f"## {name}  ({time.perf_counter() - t0:.0f} s)\n\n{table}\n"
        print("\n" + tables[name], flush=True)
        ordered = [tables[n] for n in PAPERS if n in tables]
        (out / "tables.md").write_text("\n".join(ordered))  # after each paper: a stopped run keeps the rest
    print(f"all tables: {out / 'tables.md'}; plots under {out}")


if __name__ == "__main__":
    main()
