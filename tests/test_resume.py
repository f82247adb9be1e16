"""resume=auto against a changed config, SLURM requeues, and what dry_run builds (kd_lightning.engine.resume)."""

import json
import os
from pathlib import Path

import pytest

from kd_lightning.engine.resume import newest_checkpoint, resume_mode
from kd_lightning.errors import ConfigError
from kd_lightning.runners.run import run

from .conftest import FAST, compose_cfg


def test_resume_refuses_a_changed_config_and_accepts_named_keys(make_cfg):
    done = run(make_cfg(out="run"))
    out = Path(done["output_dir"])
    before = (out / "results.json").read_bytes()
    # The user forgot to repeat trainer.max_epochs (FAST sets 2): not "ok, finished", an error naming it.
    with pytest.raises(ConfigError, match=r"trainer\.max_epochs: 2 \(run\) → 3 \(now\).*resume_accept=\["):
        run(make_cfg("resume=auto", "trainer.max_epochs=3", out="run"))
    with pytest.raises(ConfigError, match=r"distill\.terms\.feat: .*distill\.terms\.kd: None \(run\)"):
        run(make_cfg("resume=auto", "distill=kd", out="run"))
    # Without resume=auto the finished run is not replaced, not even by a config that fails its checks.
    with pytest.raises(ConfigError, match=r"holds a finished run .*resume=auto.*overwrite=true"):
        run(make_cfg(out="run"))
    with pytest.raises(ConfigError, match=r"holds a finished run"):
        run(make_cfg("data.batch_size=0", out="run"))
    assert (out / "results.json").read_bytes() == before  # nothing already written is lost
    # The same config: a finished run is not repeated.
    assert run(make_cfg("resume=auto", out="run"))["fit_seconds"] == done["fit_seconds"]
    # Accepted: the finished run continues to the new max_epochs instead of being skipped.
    res = run(
        make_cfg(
            "resume=auto", "trainer.max_epochs=3", "resume_accept=[trainer.max_epochs,scheduler]", out="run"
        )
    )
    assert res["status"] == "ok" and res["resumed_from"].endswith("last.ckpt")
    assert res["resume_accepted"] == ["scheduler.T_max: 2 → 3", "trainer.max_epochs: 2 → 3"]
    assert res["config_hash"] != done["config_hash"]
    import torch

    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["epoch"] == 2


def test_a_moved_run_folder_resumes_and_overwrite_moves_the_old_run_aside(make_cfg, tmp_path):
    import shutil

    done = run(make_cfg(out="a"))
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    # paths-derived keys (checkpoint dirpath, default_root_dir, the CSV folder) follow the folder
    again = run(make_cfg("resume=auto", out="b"))
    assert again["fit_seconds"] == done["fit_seconds"] and again["config_hash"] == done["config_hash"]
    fresh = run(make_cfg("overwrite=true", out="b"))
    assert fresh["status"] == "ok" and fresh["fit_seconds"] != done["fit_seconds"]
    aside = list((tmp_path / "b" / ".kd" / "replaced").iterdir())
    assert len(aside) == 1 and (aside[0] / "results.json").is_file() and (aside[0] / "checkpoints").is_dir()
    assert json.loads((aside[0] / "results.json").read_text())["fit_seconds"] == done["fit_seconds"]


def test_a_killed_runs_results_say_running_and_resume_continues_it(make_cfg):
    done = run(make_cfg(out="run"))
    out = Path(done["output_dir"])
    # What a SIGKILL while extending the run leaves behind: results.json of the start of the extension.
    record = dict(done, status="running", config_hash="0" * 16)
    (out / "results.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"holds a run that did not finish \(it was killed\)"):
        run(make_cfg(out="run"))
    res = run(make_cfg("resume=auto", out="run"))  # not "already finished": the record is not ok
    assert res["status"] == "ok" and res["resumed_from"].endswith("last.ckpt")
    assert res["config_hash"] == done["config_hash"]


def test_a_slurm_requeued_job_resumes_by_itself(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg()
    assert resume_mode(cfg.resume) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume_mode(cfg.resume) == "auto"
    assert resume_mode(make_cfg("resume=null").resume) == "auto"
    # The newest of last.ckpt and Lightning's SLURM requeue checkpoint is the one resumed from.
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert newest_checkpoint(tmp_path) == last
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"x")
    os.utime(last, (1, 1))
    assert newest_checkpoint(tmp_path) == hpc


def test_dry_run_trains_nothing_and_says_what_it_built(tmp_path, capsys):
    cache = tmp_path / "fresh_cache"  # no fitted teacher in it
    cfg = compose_cfg([*FAST, "dry_run=true", "print_summary=true"], tmp_path / "run", cache)
    res = run(cfg)
    assert res["status"] == "dry_run"
    assert not (cache / "teachers").exists() or not any((cache / "teachers").rglob("*.pt"))
    printed = capsys.readouterr().out
    assert printed.strip() == res["dry_run_summary"]
    for part in (
        "dry run, nothing trained",
        "digits",
        "student mlp with",
        "cnn_s (",
        "not fitted yet",
        "feat (mse on embed)",
        "2 epochs",
    ):
        assert part in printed, part
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "dry_run"


def test_last_ckpt_is_the_last_epoch_even_when_val_acc_stopped_improving(make_cfg):
    """Lightning's save_last beside monitor rewrites last.ckpt only on improvement; ours every epoch."""
    import torch

    res = run(make_cfg("trainer.max_epochs=3", "optim.lr=1e-12"))  # val/acc flat after epoch 0
    out = Path(res["output_dir"])
    assert Path(res["best_checkpoint"]).name == "epoch000.ckpt"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["epoch"] == 2


def test_results_json_says_running_with_its_progress_while_a_run_goes(make_cfg):
    from .conftest import ReadResultsDuringFit

    ReadResultsDuringFit.SEEN.clear()
    res = run(
        make_cfg("trainer.max_epochs=3", "+callbacks.watch._target_=tests.conftest.ReadResultsDuringFit")
    )
    seen = ReadResultsDuringFit.SEEN
    assert [s["status"] for s in seen] == ["running", "running"]
    assert [s["progress"]["epochs_done"] for s in seen] == [1, 2] and seen[0]["progress"]["max_epochs"] == 3
    assert seen[0]["run_pid"] == os.getpid() and seen[0]["config_hash"] == res["config_hash"]
    assert res["status"] == "ok"
