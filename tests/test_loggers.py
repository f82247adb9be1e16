"""Every logger config writes its files offline: csv, tensorboard, mlflow (local store), wandb (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_lightning.runners.run import run

BASE = ("teachers=none", "distill=none", "callbacks=none", "trainer.max_epochs=2")


def test_csv_and_tensorboard(make_cfg):
    cfg = make_cfg(*BASE, "logger=[csv,tensorboard]")
    assert run(cfg)["status"] == "ok"
    out = Path(cfg.paths.output_dir)
    assert "val/acc" in (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_mlflow_writes_a_local_store_with_the_metrics(make_cfg, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra (in .[dev]) is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_cfg(*BASE, "logger=mlflow")
    uri = cfg.logger.mlflow.tracking_uri
    assert uri.startswith("sqlite:///")  # a local store by default, no server
    cfg.logger.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert run(cfg)["status"] == "ok"
    client = MlflowClient(cfg.logger.mlflow.tracking_uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "kd_lightning"]
    [mlrun] = client.search_runs([experiment.experiment_id])
    assert {"val/acc", "train/loss"} <= set(mlrun.data.metrics)
    assert len(client.get_metric_history(mlrun.info.run_id, "val/acc")) == 2  # one per epoch


def test_wandb_runs_offline_one_run_per_job(make_cfg, tmp_path, cache_dir, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra (in .[dev]) is not installed")
    from .conftest import compose_cfg

    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    records = []
    for job in range(2):  # two jobs in one process, as a multirun's basic launcher runs them
        cfg = compose_cfg(
            [*BASE, "logger=wandb", "trainer.enable_progress_bar=false"], tmp_path / f"job{job}", cache_dir
        )
        assert cfg.logger.wandb.offline is True
        assert run(cfg)["status"] == "ok"
        records += list((tmp_path / f"job{job}" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 2 and records[0].parent.name != records[1].parent.name  # a run of its own each
    for record in records:
        data = record.read_bytes()
        assert b"val/acc" in data and b"train/loss" in data  # the metrics are in the offline record
