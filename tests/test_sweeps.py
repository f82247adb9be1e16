"""Sweeps over teacher combinations: the subset resolver, and a real parallel sweep → kd-report → notebook."""

import json
import os

import pytest
from omegaconf import OmegaConf

from kd_lightning.cli.report import write_report
from kd_lightning.config.resolvers import register_resolvers
from kd_lightning.config.run_spec import parse_run
from kd_lightning.config.sweeps import sweep_string, teacher_subsets
from kd_lightning.errors import ConfigError

from .conftest import FAST, ROOT, compose_cfg, run_cli


def test_every_non_empty_subset_smallest_first():
    assert teacher_subsets(["a", "b", "c"]) == [
        ["a"], ["b"], ["c"], ["a", "b"], ["a", "c"], ["b", "c"], ["a", "b", "c"]
    ]  # fmt: skip
    assert teacher_subsets(["a", "b", "c"], min_size=2, max_size=2) == [["a", "b"], ["a", "c"], ["b", "c"]]
    assert sweep_string([["a"], ["a", "b"]]) == "[a],[a,b]"


@pytest.mark.parametrize(("pool", "lo", "hi"), [([], 1, None), (["a"], 2, None), (["a", "a"], 1, None)])
def test_impossible_subsets_are_config_errors(pool, lo, hi):
    with pytest.raises(ConfigError, match="teacher"):
        teacher_subsets(pool, lo, hi)


def test_sweep_config_expands_the_chosen_pool(tmp_path, cache_dir):
    register_resolvers()
    cfg = compose_cfg(["experiment=landro2021", "sweep=teacher_subsets"], tmp_path, cache_dir)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    subsets = params["teachers.use"].split("],[")
    assert len(subsets) == 7 and params["teachers.use"].endswith("[cnn_a,cnn_b,cnn_c]")
    assert cfg.hydra.mode.name == "MULTIRUN"
    cfg = compose_cfg(
        ["experiment=landro2021", "sweep=teacher_subsets", "sweep_include_none=true"], tmp_path, cache_dir
    )
    assert OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)["teachers.use"].startswith(
        "[],[cnn_a],"
    )


def test_the_no_teacher_point_trains_the_student_alone(tmp_path, cache_dir):
    """teachers.use=[] (sweep_include_none=true): the job's distill terms go, CE with weight 1 stays."""
    from kd_lightning.runners.run import run

    cfg = compose_cfg(
        ["experiment=landro2021", "teachers.use=[]", "dry_run=true", "logger=none"], tmp_path, cache_dir
    )
    res = run(cfg)
    assert res["status"] == "dry_run" and res["teacher_set"] == "none" and res["distance"] == "none"
    assert "no teachers" in res["dry_run_summary"] and "objective CE×1;" in res["dry_run_summary"]


@pytest.mark.parametrize(
    ("use", "label"),
    [("null", "cnn_a+cnn_b+cnn_c"), ("[cnn_c,cnn_a]", "cnn_c+cnn_a"), ("cnn_b", "cnn_b"), ("[]", "none")],
)
def test_teacher_set_label(tmp_path, cache_dir, use, label):
    cfg = compose_cfg(["experiment=landro2021", f"teachers.use={use}"], tmp_path, cache_dir)
    assert parse_run(cfg).teachers.label == label


@pytest.mark.multiprocess
def test_parallel_teacher_subset_sweep_report_and_notebook(tmp_path, cache_dir):
    """3 teacher sets × 2 loss weights (one invalid) in 2 parallel processes; the bad jobs fail alone."""
    sweep = tmp_path / "sweep"
    env = {"KD_CACHE_DIR": str(cache_dir), "KD_OUTPUT_ROOT": str(tmp_path / "out")}
    proc = run_cli(
        *FAST,
        "sweep=teacher_subsets",
        "hydra/launcher=local",
        "hydra.launcher.n_jobs=2",
        "distill.terms.feat.weight=1.0,oops",
        f"hydra.sweep.dir={sweep}",
        cwd=ROOT,
        env=env,
        timeout=900,
    )
    assert proc.returncode != 0, "the sweep must report its failed jobs"
    results = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    ok = sorted(r["teacher_set"] for r in results if r["status"] == "ok")
    bad = [r for r in results if r["status"] == "config_error"]
    assert ok == ["cnn_l", "cnn_s", "cnn_s+cnn_l"], proc.stderr[-3000:]
    assert len(bad) == 3 and all("distill.terms.feat.weight" in r["error"] for r in bad)

    table, md = write_report(sweep)
    assert len(table) == 3 and table["n"].tolist() == [1, 1, 1]
    assert "Failed runs:" in md and md.count("config_error") == 3
    for name in (
        "report.csv",
        "report.md",
        "runs.csv",
        "accuracy_by_teacher_set.png",
        "accuracy_vs_n_teachers.png",
    ):
        assert (sweep / name).stat().st_size > 0, name

    cli = run_cli(str(sweep), "--out", str(tmp_path / "rep"), cwd=ROOT, module="kd_lightning.cli.report")
    assert cli.returncode == 0 and "cnn_s+cnn_l" in cli.stdout and "(tied)" in cli.stdout  # n = 1: no winner

    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["KD_REPORT_DIR"], os.environ["KD_REPORT_OUT"] = str(sweep), str(tmp_path / "nb")
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        del os.environ["KD_REPORT_DIR"], os.environ["KD_REPORT_OUT"]
    text = json.dumps(nb)
    assert "cnn_s+cnn_l" in text and "image/png" in text and "config_error" in text


def test_optuna_hparams_search_maximises_val_acc(tmp_path, cache_dir):
    sweep = tmp_path / "optuna"
    env = {"KD_CACHE_DIR": str(cache_dir), "KD_OUTPUT_ROOT": str(tmp_path / "out")}
    proc = run_cli(
        *FAST, "hparams_search=mnist1d_optuna", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}",
        cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert set(best.best_params) == {
        "distill.terms.feat.weight", "distill.terms.kd.weight", "distill.terms.kd.temperature", "optim.lr"
    }  # fmt: skip
    trials = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    assert len(trials) == 3 and best.best_value == max(t["val_acc"] for t in trials)


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_launcher_configs_compose_with_the_fields_users_set(tmp_path, cache_dir, launcher):
    cfg = compose_cfg(
        [f"hydra/launcher={launcher}", "experiment=landro2021", "sweep=teacher_subsets"], tmp_path, cache_dir
    )
    lc = cfg.hydra.launcher
    if launcher == "slurm":
        assert "SlurmLauncher" in lc._target_
        assert {"partition", "nodes", "tasks_per_node", "gpus_per_node", "timeout_min"} <= set(lc)
    else:
        assert "JoblibLauncher" in lc._target_ and int(lc.n_jobs) >= 1


@pytest.mark.multiprocess
@pytest.mark.parametrize("parallel", [1, 2])
def test_subset_sweep_runs_each_teacher_once(tmp_path, cache_dir, parallel):
    """sweep=teacher_subsets over 3 teachers with disk stores: the 7 jobs together ran each teacher once on
    the training set (teacher_forward_samples summed = 3 × train_samples), also with 2 jobs at a time."""
    sweep = tmp_path / "sweep"
    launcher = ["hydra/launcher=local", f"hydra.launcher.n_jobs={parallel}"] if parallel > 1 else []
    proc = run_cli(
        "experiment=landro2021",
        "sweep=teacher_subsets",
        "data.num_samples=1000",
        "trainer.max_epochs=1",
        "teachers.members.cnn_a.fit.max_epochs=1",
        "teachers.members.cnn_b.fit.max_epochs=1",
        "teachers.members.cnn_c.fit.max_epochs=1",
        "distill.terms.feat.combine=per_teacher",
        "teacher_cache.mode=disk",
        f"teacher_cache.dir={tmp_path / 'stores'}",
        "logger=none",
        "callbacks=none",
        "trainer.enable_progress_bar=false",
        "print_summary=false",
        f"hydra.sweep.dir={sweep}",
        *launcher,
        cwd=ROOT,
        env={"KD_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rs = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    assert len(rs) == 7 and all(r["status"] == "ok" for r in rs)
    n = rs[0]["train_samples"]
    assert sum(r["teacher_forward_samples"] for r in rs) == 3 * n


def test_gpu_pool_sizes_itself_by_the_gpus_and_gives_each_job_one(monkeypatch, capsys):
    """hydra/launcher=gpu_pool: jobs_per_gpu × GPUs at once, job N on GPU N mod GPUs; one at a time without
    a GPU, said once."""
    from kd_lightning.config import resolvers
    from kd_lightning.engine.launch import pool_devices

    monkeypatch.setattr(resolvers, "visible_gpus", lambda: 2)
    assert resolvers.pool_jobs(4) == 8
    monkeypatch.setattr(resolvers, "visible_gpus", lambda: 0)
    resolvers._SAID.clear()
    assert resolvers.pool_jobs(4) == 1 and resolvers.pool_jobs("8") == 1
    assert capsys.readouterr().err.count("gpu_pool: no CUDA GPU here") == 1
    with pytest.raises(ValueError, match="jobs_per_gpu"):
        resolvers.pool_jobs(0)
    gpu = {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed"}
    assert pool_devices(gpu, 5, 2) == {**gpu, "devices": [1]}
    assert pool_devices({**gpu, "accelerator": "auto"}, 4, 3)["devices"] == [1]
    for unchanged, gpus in (({**gpu, "accelerator": "cpu"}, 2), ({**gpu, "devices": 2}, 2), (gpu, 0)):
        assert pool_devices(unchanged, 3, gpus) == unchanged


@pytest.mark.multiprocess
def test_a_gpu_pool_sweep_gives_the_results_of_the_jobs_run_one_by_one(tmp_path, cache_dir):
    """On the CPU the pool falls back to one job at a time (one line says so): the same teacher-subset sweep
    then ends with exactly the results of Hydra's basic launcher, job for job."""
    env = {"KD_CACHE_DIR": str(cache_dir), "KD_OUTPUT_ROOT": str(tmp_path / "out")}
    results = {}
    for launcher in ("basic", "gpu_pool"):
        sweep = tmp_path / launcher
        proc = run_cli(
            "-m", *FAST, "teachers.use=[cnn_s],[cnn_s,cnn_l]", f"hydra/launcher={launcher}",
            f"hydra.sweep.dir={sweep}", cwd=ROOT, env=env, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        done = [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]
        results[launcher] = {r["teacher_set"]: (r["status"], r["test_acc"], r["val_acc"]) for r in done}
        if launcher == "gpu_pool":
            assert proc.stderr.count("gpu_pool: no CUDA GPU here, so the sweep's jobs run one at a time") == 1
    assert len(results["basic"]) == 2 and results["gpu_pool"] == results["basic"]
