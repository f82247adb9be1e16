"""Every logger config writes its files offline: csv, tensorboard, mlflow (local store), wandb (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_lightning.runners.run import run

BASE = ("teachers=none", "distill=none", "callbacks=none", "trainer.max_epochs=2")


def test_csv_and_tensorboard(make_cfg):
    cfg = make_cfg(*BASE, "logger=[csv,tensorboard]", "optim.lr=0.002")
    res = run(cfg)
    assert res["status"] == "ok"
    out = Path(cfg.paths.output_dir)
    assert "val/acc" in (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    # TensorBoard: the run is named after its overrides, and its HPARAMS tab holds the resolved config and
    # the final test metrics (a row per run, filterable by any config key)
    [version] = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    assert version.name.startswith("callbacks=none,") and "optim.lr=0.002" in version.name
    assert "optim.lr: 0.002" in (version / "hparams.yaml").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(version))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert session.session_start_info.hparams["optim.lr"].number_value == pytest.approx(0.002)
    assert session.session_start_info.hparams["data._target_"].string_value.endswith("DigitsDataModule")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"final/test_acc", "final/last_test_acc"}
    [final] = ea.Scalars("final/test_acc")
    assert final.value == pytest.approx(res["test_acc"])


def test_mlflow_writes_a_local_store_with_the_metrics(make_cfg, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra (in .[dev]) is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_cfg(*BASE, "logger=mlflow")
    uri = cfg.logger.mlflow.tracking_uri
    assert uri.startswith("sqlite:///")  # a local store by default, no server
    cfg.logger.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = run(cfg)
    assert res["status"] == "ok"
    run_test_acc = res["test_acc"]
    client = MlflowClient(cfg.logger.mlflow.tracking_uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "kd_lightning"]
    [mlrun] = client.search_runs([experiment.experiment_id])
    assert {"val/acc", "train/loss"} <= set(mlrun.data.metrics)
    assert len(client.get_metric_history(mlrun.info.run_id, "val/acc")) == 2  # one per epoch
    # the config as parameters, the final test accuracy, and a run name that tells the runs apart
    assert mlrun.data.params["optim.lr"] == str(cfg.optim.lr) and "distill.ce_weight" in mlrun.data.params
    assert mlrun.data.metrics["final/test_acc"] == pytest.approx(run_test_acc)
    assert "distill=none,teachers=none" in mlrun.info.run_name and "logger=" not in mlrun.info.run_name


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
        assert b"optim.lr" in data and b"final/test_acc" in data  # the config and the final accuracy
