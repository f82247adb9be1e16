"""kd-report answers "do teachers help?": baseline rows, a winner only when its interval clears, honest plots."""

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from kd_lightning.analysis.stats import BASELINE, collect, summarize, to_markdown
from kd_lightning.cli.report import write_report


def _write(root: Path, name: str, teacher_set: str, seed: int, acc: float, baseline: float | None = None):
    folder = root / name
    folder.mkdir(parents=True)
    r = {"status": "ok", "seed": seed, "data": "digits", "student": "mlp", "teacher_set": teacher_set,
         "distill": "feature", "distance": "mse", "test_acc": acc}  # fmt: skip
    if baseline is not None:
        r["baseline_test_acc"] = baseline
    (folder / "results.json").write_text(json.dumps(r))


def test_baseline_rows_appear_once_per_seed(tmp_path):
    # Two teacher sets, each job with baseline=true: the same student-alone run per seed, counted once.
    for seed, base in ((0, 0.90), (1, 0.91)):
        _write(tmp_path, f"a{seed}", "cnn_s", seed, 0.95, base)
        _write(tmp_path, f"b{seed}", "cnn_l", seed, 0.96, base)
    df = collect(tmp_path)
    table = summarize(df)
    base = table[table["teacher_set"] == BASELINE]
    assert len(base) == 1 and int(base["n"].iloc[0]) == 2
    assert base["mean"].iloc[0] == pytest.approx(0.905)
    assert (df["n_teachers"] == 0).sum() == 2


def test_best_only_when_the_interval_clears_the_runner_up(tmp_path):
    clear = tmp_path / "clear"
    for seed in range(3):
        _write(clear, f"a{seed}", "cnn_s", seed, 0.95 + 0.001 * seed)
        _write(clear, f"b{seed}", "cnn_l", seed, 0.90 + 0.001 * seed)
    table = summarize(collect(clear))
    assert table["verdict"].tolist() == ["best", ""]
    assert "(best)" in to_markdown(table)

    tied = tmp_path / "tied"  # means 0.950 vs 0.945, spread over seeds far wider than the gap
    for seed, (a, b) in enumerate(((0.93, 0.96), (0.97, 0.93))):
        _write(tied, f"a{seed}", "cnn_s", seed, a)
        _write(tied, f"b{seed}", "cnn_l", seed, b)
    table = summarize(collect(tied))
    md = to_markdown(table)
    assert table["verdict"].tolist() == ["tied", "tied"] and "(best)" not in md and md.count("(tied)") == 2

    single = tmp_path / "single"  # n = 1: no interval, nothing to claim
    _write(single, "a", "cnn_s", 0, 0.99)
    _write(single, "b", "cnn_l", 0, 0.50)
    assert summarize(collect(single))["verdict"].tolist() == ["tied", "tied"]


def test_plots_start_at_zero_and_mark_the_student_alone(tmp_path, monkeypatch):
    import matplotlib.axes

    for seed in range(2):
        _write(tmp_path, f"a{seed}", "cnn_s", seed, 0.95, 0.90)
    limits, lines = [], []
    real_ylim, real_axhline = matplotlib.axes.Axes.set_ylim, matplotlib.axes.Axes.axhline
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_ylim", lambda ax, *a, **k: limits.append(a) or real_ylim(ax, *a, **k)
    )
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "axhline",
        lambda ax, y=0, *a, **k: lines.append(y) or real_axhline(ax, y, *a, **k),
    )
    write_report(tmp_path)
    assert (0, 100) in limits  # the bar chart's axis starts at 0
    assert lines == [pytest.approx(90.0)]  # the baseline as a reference line
    assert mpimg.imread(tmp_path / "accuracy_by_teacher_set.png").shape[0] > 0


def test_gain_interval_is_welchs_t_interval():
    from scipy.stats import ttest_ind

    from kd_lightning.analysis.stats import gain_interval

    a, b = [0.81, 0.80, 0.83, 0.79, 0.82], [0.78, 0.80, 0.76]
    diff, half = gain_interval(a, b)
    assert diff == pytest.approx(sum(a) / 5 - sum(b) / 3)
    # the interval's edge is where Welch's test has p = 0.05
    shifted = [v - (diff - half) for v in a]
    assert ttest_ind(shifted, b, equal_var=False).pvalue == pytest.approx(0.05, rel=1e-6)
    assert gain_interval([0.8], b)[1] == float("inf")


def test_paired_interval_is_the_paired_t_interval():
    from scipy.stats import ttest_rel

    from kd_lightning.analysis.stats import paired_interval

    a, b = [0.81, 0.80, 0.86, 0.79], [0.78, 0.79, 0.83, 0.77]
    diff, half = paired_interval(a, b)
    assert diff == pytest.approx(0.0225)
    shifted = [v - (diff - half) for v in a]  # at the interval's edge the paired test has p = 0.05
    assert ttest_rel(shifted, b).pvalue == pytest.approx(0.05, rel=1e-6)
    with pytest.raises(ValueError):
        paired_interval(a, b[:3])


def test_the_teacher_count_plot_never_pools_methods_and_says_only_what_it_draws(tmp_path, monkeypatch):
    """A sweep over distill=kd,logit_mse: one line per method, not their mean; no 'gray' without a gray bar."""
    import matplotlib.axes

    from kd_lightning.cli.report import n_teacher_series

    for seed in range(2):
        for distill, acc in (("kd", 0.766), ("logit_mse", 0.647)):
            folder = tmp_path / f"{distill}{seed}"
            folder.mkdir()
            r = {"status": "ok", "seed": seed, "data": "digits", "student": "mlp", "teacher_set": "cnn_s",
                 "distill": distill, "distance": "kl", "test_acc": acc}  # fmt: skip
            (folder / "results.json").write_text(json.dumps(r))
    series = n_teacher_series(collect(tmp_path))
    assert set(series) == {"distill=kd", "distill=logit_mse"}
    assert [float(series[k]["mean"].iloc[0]) for k in sorted(series)] == pytest.approx([0.766, 0.647])
    titles = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_title", lambda ax, t, *a, **k: titles.append(t) or real(ax, t, *a, **k)
    )
    write_report(tmp_path)
    assert not any("gray" in t for t in titles)  # no student-alone bar here


def _run(root: Path, name: str, seed: int, acc: float, lr: float, teacher_set: str = "cnn_s") -> None:
    """A finished run folder: results.json and the resolved config the run recorded."""
    _write(root, name, teacher_set, seed, acc)
    config = {"seed": seed, "data": {"batch_size": 64}, "optim": {"_target_": "torch.optim.Adam", "lr": lr},
              "paths": {"output_dir": str(root / name)}, "trainer": {"default_root_dir": str(root / name)},
              "callbacks": {"last": {"dirpath": str(root / name / "checkpoints")}}}  # fmt: skip
    (root / name / "config.resolved.yaml").write_text(json.dumps(config))  # JSON is YAML


def test_runs_of_different_settings_are_never_pooled_and_a_pooling_by_is_warned(tmp_path, capsys):
    """A sweep over optim.lr=0.0001,0.01 (two seeds each): two rows with an optim.lr column, not one row
    pooling both; `--by` that leaves optim.lr out pools them, and says so."""
    for seed in range(2):
        _run(tmp_path, f"low{seed}", seed, 0.30 + 0.01 * seed, 0.0001)
        _run(tmp_path, f"high{seed}", seed, 0.90 + 0.01 * seed, 0.01)
    table, md = write_report(tmp_path, plots=False)
    assert len(table) == 2 and sorted(table["cfg:optim.lr"]) == ["0.0001", "0.01"]
    assert "| optim.lr |" in md.splitlines()[0].replace("teacher_set | distill | distance | ", "")
    assert (
        list(table["n"]) == [2, 2] and "pool" not in md
    )  # the seed and the run folders differ: not a setting
    table, md = write_report(tmp_path, keys=["teacher_set"], plots=False)
    assert len(table) == 1 and "rows pool runs whose configs differ beyond the seed, in optim.lr" in md
    assert "optim.lr" in capsys.readouterr().err


def test_plots_draw_the_tables_statistic_with_n_from_zero(tmp_path, monkeypatch):
    import matplotlib.axes

    for seed in range(3):
        _run(tmp_path, f"a{seed}", seed, 0.80 + 0.01 * seed, 0.001)
        _run(tmp_path, f"b{seed}", seed, 0.81 + 0.01 * seed, 0.01)
    drawn, texts, labels, limits = [], [], [], []
    real_bar, real_text = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.text
    real_ylabel, real_ylim = matplotlib.axes.Axes.set_ylabel, matplotlib.axes.Axes.set_ylim
    monkeypatch.setattr(matplotlib.axes.Axes, "bar",
                        lambda ax, x, h, *a, **k: drawn.append(k.get("yerr")) or real_bar(ax, x, h, *a, **k))  # fmt: skip
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda ax, x, y, s, *a, **k: texts.append(s) or real_text(ax, x, y, s, *a, **k))  # fmt: skip
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel",
                        lambda ax, s, *a, **k: labels.append(s) or real_ylabel(ax, s, *a, **k))  # fmt: skip
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylim",
                        lambda ax, *a, **k: limits.append(a) or real_ylim(ax, *a, **k))  # fmt: skip
    table, _ = write_report(tmp_path)
    assert drawn == [pytest.approx([100 * h for h in table["ci95"]])]  # the table's 95 % intervals, not ± std
    assert texts == ["n=3", "n=3"] and all("95 % interval" in s for s in labels) and len(labels) == 2
    assert limits.count((0, 100)) == 2  # both plots set their accuracy axes from 0 to 100
