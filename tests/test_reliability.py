"""Nothing already written is lost: resume after SIGKILL, non-finite losses, failed sweep jobs."""

import csv
import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kd_lightning.runners.run import run

from .conftest import FAST, ROOT

# Deterministic KD job whose epochs take long enough (small batches) to be killed mid-epoch.
JOB = [
    *FAST,
    "data.batch_size=8",
    "trainer.max_epochs=4",
    "trainer.deterministic=true",
    "seed=3",
    "logger=csv",
]


def _launch(run_dir: Path, cache_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "KD_CACHE_DIR": str(cache_dir)}  # warnings shown: the resume checks read them
    cmd = [sys.executable, "-m", "kd_lightning.train", *JOB, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _student_weights(ckpt: Path) -> dict:
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in sd.items() if k.startswith("student.")}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir) -> Path:
    """The job of the interruption tests, never interrupted."""
    folder = tmp_path_factory.mktemp("reference")
    reference = _launch(folder, cache_dir)
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-3000:]
    return folder


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGKILL, id="sigkill", marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, id="sigterm"),
    ],
)
def test_killed_mid_epoch_then_resume_auto_matches_uninterrupted_run(tmp_path, cache_dir, reference_run, sig):
    ref = json.loads((reference_run / "results.json").read_text())
    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = _launch(run_dir, cache_dir)
    deadline = time.time() + 300
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert last.is_file(), "no checkpoint was written before the deadline"
    time.sleep(0.5)  # well into the next epoch
    assert proc.poll() is None, "the run finished before it could be killed; make the job longer"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    killed_epoch = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert killed_epoch < 3
    if sig == signal.SIGTERM:  # a signal the run can handle: recorded as an interruption, not a failure
        assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
        res = json.loads((run_dir / "results.json").read_text())
        assert res["status"] == "interrupted" and res["last_checkpoint"] == str(last)
        assert res["resume_command"].endswith(f"resume=auto hydra.run.dir={run_dir}") and "Resume with" in out
    else:
        killed = json.loads((run_dir / "results.json").read_text())
        assert killed["status"] == "running"
        # the progress is what last.ckpt holds: it is written once an epoch's checkpoints are
        assert killed["progress"]["epochs_done"] == killed_epoch + 1 == len(killed["epoch_seconds"])

    resumed = _launch(run_dir, cache_dir, "resume=auto")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    # no false alarms on resume: the earlier rows of metrics.csv are kept, the checkpoints are the run's own
    assert "Previous log files" not in out and "exists and is not empty" not in out
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "ok" and res["resumed_from"].endswith("last.ckpt")
    # Same final metrics and weights as the run that was never interrupted (CPU, deterministic mode).
    assert res["test_acc"] == pytest.approx(ref["test_acc"], abs=1e-6)
    assert res["val_acc"] == pytest.approx(ref["val_acc"], abs=1e-6)
    a, b = _student_weights(reference_run / "checkpoints" / "last.ckpt"), _student_weights(last)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # The metrics log keeps every epoch once (those before the interruption included).
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    val_epochs = [int(r["epoch"]) for r in rows if r.get("val/acc")]
    assert val_epochs == [0, 1, 2, 3]
    # The run's figures cover both attempts: each epoch's time once, the fit time and the teachers' work
    # of both (the RAM store is made again by the second), and the resume said so on the console.
    assert res["attempts"] == 2 and len(res["epoch_seconds"]) == 4
    assert res["teacher_forward_samples"] == 2 * ref["teacher_forward_samples"] > 0
    assert res["fit_seconds"] > sum(res["epoch_seconds"][killed_epoch + 1 :])
    assert f"resuming {run_dir} from {last}: {killed_epoch + 1} of 4 epochs done (attempt 2)" in out

    # A finished run is not repeated by resume=auto.
    again = _launch(run_dir, cache_dir, "resume=auto")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "already finished" in out
    if sig != signal.SIGKILL:
        return
    # Extended by an epoch and killed half-way: results.json says so, and the same command continues the
    # run to its new end instead of reporting the 4-epoch results as final.
    extend = ("trainer.max_epochs=5", "resume=auto", "resume_accept=[trainer.max_epochs,scheduler]")
    proc = _launch(run_dir, cache_dir, *extend)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        rec = json.loads((run_dir / "results.json").read_text())
        if rec["status"] == "running" and rec["config_hash"] != res["config_hash"]:
            break
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "the extension finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "running"
    again = _launch(run_dir, cache_dir, *extend)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "already finished" not in out, out[-3000:]
    extended = json.loads((run_dir / "results.json").read_text())
    assert extended["status"] == "ok" and extended["config_hash"] != res["config_hash"]
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 4
    assert extended["test_acc"] is not None and extended["fit_seconds"] != res["fit_seconds"]


def test_non_finite_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(make_cfg):
    cfg = make_cfg(
        "trainer.max_epochs=3",
        "+callbacks.poison._target_=tests.conftest.PoisonWeightsAtEpoch",
        "+callbacks.poison.epoch=1",
    )
    with pytest.raises(FloatingPointError, match="non-finite training loss .* epoch 1"):
        run(cfg)
    out = Path(cfg.paths.output_dir)
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "failed" and "non-finite training loss" in res["error"]
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_results_json_is_written_atomically(tmp_path):
    from kd_lightning.runners.results import write_json_atomic

    path = write_json_atomic(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, math.inf]})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None]}  # valid JSON, no NaN tokens
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


@pytest.mark.multiprocess
def test_failed_sweep_job_leaves_the_others_intact(tmp_path, cache_dir):
    env = {**os.environ, "KD_CACHE_DIR": str(cache_dir), "PYTHONWARNINGS": "ignore"}
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "kd_lightning.train",
        "-m",
        *FAST,
        "distill.terms.feat.distance=mse,nope,cosine",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # the sweep reports the failure...
    statuses = {
        json.loads(p.read_text())["distance"]: json.loads(p.read_text())["status"]
        for p in sweep.rglob("results.json")
    }
    assert statuses == {"mse": "ok", "nope": "config_error", "cosine": "ok"}  # ...and every other job ran


def test_a_checkpoint_that_cannot_be_saved_leaves_no_partial_file_and_the_status_says_why(
    make_cfg, monkeypatch
):
    import errno

    real = torch.save
    calls = {"n": 0}

    def disk_fills_after_epoch_0(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # epoch 0's two checkpoints (best, last) fit; from epoch 1 the disk is full
            f.write(b"the first half of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_after_epoch_0)
    cfg = make_cfg("trainer.max_epochs=3")
    with pytest.raises(OSError, match="could not save checkpoint .*epoch001.ckpt .*No space left"):
        run(cfg)
    monkeypatch.undo()
    out = Path(cfg.paths.output_dir)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch000.ckpt", "last.ckpt"]
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0
    res = json.loads((out / "results.json").read_text())
    assert (
        res["status"] == "failed"
        and "No space left on device" in res["error"]
        and "resume=auto" in res["error"]
    )


def test_a_disk_that_fills_during_a_checkpoint_save_leaves_no_truncated_checkpoint(make_cfg, tmp_path):
    """On a real filesystem that fills up: Lightning's own save copies a temporary file from the system's
    temp folder and leaves a truncated checkpoint under its final name; ours leaves none."""
    from .conftest import small_filesystem

    probe = make_cfg("trainer.max_epochs=1", "logger=none")
    run(probe)
    size = (Path(probe.paths.output_dir) / "checkpoints" / "last.ckpt").stat().st_size
    with small_filesystem(tmp_path / "small", size=f"{int(2.6 * size) // 4096 * 4096 + 4096}") as small:
        cfg = make_cfg("trainer.max_epochs=3", "logger=none", out="small/run")
        with pytest.raises(OSError, match="could not save checkpoint"):
            run(cfg)
        ckpts = sorted((small / "run" / "checkpoints").glob("*.ckpt"))
        for p in ckpts:  # whatever is there is whole
            assert torch.load(p, map_location="cpu", weights_only=True)["epoch"] >= 0
        assert not [p for p in (small / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
        res = json.loads((small / "run" / "results.json").read_text())
        assert res["status"] == "failed" and "No space left" in res["error"]


@pytest.mark.multiprocess
def test_a_second_run_into_a_live_folder_stops_at_once_and_changes_nothing(tmp_path, cache_dir):
    folder = tmp_path / "shared"
    first = _launch(folder, cache_dir, "seed=0")
    owner = folder / ".kd" / "owner.json"
    deadline = time.time() + 300
    while not owner.is_file() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert owner.is_file() and first.poll() is None
    overrides = (folder / ".hydra" / "overrides.yaml").read_text() if (folder / ".hydra").is_dir() else None
    second = _launch(folder, cache_dir, "seed=1")
    out, _ = second.communicate(timeout=300)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert second.returncode == 2 and len(lines) == 1, out[-2000:]
    assert f"{folder} is in use by another run (pid {first.pid} on " in lines[0]
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-2000:]
    res = json.loads((folder / "results.json").read_text())
    assert res["status"] == "ok" and res["seed"] == 0 and res["run_pid"] == first.pid
    if overrides is not None:
        assert (folder / ".hydra" / "overrides.yaml").read_text() == overrides
    assert "seed=0" in (folder / ".hydra" / "overrides.yaml").read_text()
    # The finished run is not replaced by a later one without resume=auto or overwrite=true either.
    third = _launch(folder, cache_dir, "seed=1")
    out, _ = third.communicate(timeout=300)
    assert third.returncode == 2 and "holds a finished run" in out and "overwrite=true" in out
    assert json.loads((folder / "results.json").read_text()) == res


class DiskFull:
    """Makes the n-th opening of a file for writing under `folder` fail with ENOSPC, as a full disk would;
    a file opened in place is left empty, as a write that fails leaves it. Through an audit hook (installed
    once per process: hooks cannot be removed), active only inside `with DiskFull(...)`."""

    active: "DiskFull | None" = None
    installed = False

    def __init__(self, folder: Path, n: int):
        self.folder, self.n, self.count, self.paths = str(folder), n, 0, []
        if not DiskFull.installed:
            sys.addaudithook(DiskFull.hook)
            DiskFull.installed = True

    def __enter__(self) -> "DiskFull":
        DiskFull.active = self
        return self

    def __exit__(self, *exc) -> None:
        DiskFull.active = None

    @staticmethod
    def hook(event: str, args: tuple) -> None:
        full = DiskFull.active
        if full is None or event != "open" or not isinstance(args[0], str | Path):
            return
        path, mode, flags = str(args[0]), args[1], args[2]
        writing = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR))
        if not path.startswith(full.folder) or not writing or path.endswith(".lock") or os.path.isdir(path):
            return
        full.count += 1
        full.paths.append(path)
        if full.count == full.n:
            DiskFull.active = None
            if ".tmp" not in path:
                open(path, "ab").close()  # created, nothing written
            raise OSError(errno.ENOSPC, "No space left on device", path)


def _whole(run_dir: Path) -> list[str]:
    """The run folder's files that are not whole (empty, cut, unreadable), and stray temporary files."""
    import yaml

    bad = []
    for p in run_dir.rglob("*"):
        if not p.is_file() or ".kd" in p.relative_to(run_dir).parts:
            continue
        try:
            if p.stat().st_size == 0 or ".tmp" in p.name:
                raise ValueError("empty or temporary")
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".yaml":
                assert yaml.safe_load(p.read_text()) is not None
            elif p.suffix in (".ckpt", ".pt"):
                torch.load(p, map_location="cpu", weights_only=True)
            elif p.suffix == ".csv":
                rows = list(csv.reader(p.open()))
                assert all(len(r) == len(rows[0]) for r in rows)
        except Exception as e:  # noqa: BLE001
            bad.append(f"{p.relative_to(run_dir)}: {e}")
    return bad


def test_a_full_disk_at_any_write_of_the_run_leaves_whole_files_and_a_resumable_run(make_cfg, tmp_path):
    """ENOSPC at each file the run writes, the first and the last time it writes it: the run stops with the
    disk's error, every file of its folder is whole (no zero-byte config, no cut checkpoint or row), and
    once space is back resume=auto finishes it."""
    job = ("teachers=none", "distill=none", "trainer.max_epochs=2", "logger=csv")
    with DiskFull(tmp_path / "count", 10**9) as counting:
        assert run(make_cfg(*job, out="count"))["status"] == "ok"
    writes = [re.sub(r"\.\d+\.tmp", "", Path(p).name).lstrip(".") for p in counting.paths]
    picks = sorted(
        {writes.index(w) for w in writes} | {len(writes) - 1 - writes[::-1].index(w) for w in writes}
    )
    assert {"results.json", "config.resolved.yaml", "last.ckpt", "metrics.csv", "student.pt"} <= set(writes)
    for i in picks:
        folder = f"full{i}"
        with DiskFull(tmp_path / folder, i + 1), pytest.raises(OSError, match="No space left on device"):
            run(make_cfg(*job, out=folder))
        assert _whole(tmp_path / folder) == [], (writes[i], _whole(tmp_path / folder))
        resumed = run(make_cfg(*job, "resume=auto", out=folder))
        assert resumed["status"] == "ok", (writes[i], resumed.get("error"))


def test_a_stop_between_an_epochs_checkpoint_and_results_json_keeps_that_epochs_time(tmp_path):
    """The signal can land after an epoch's checkpoint is saved and before results.json is rewritten: the
    resumed run takes the epochs' times from the checkpoint that holds them, so every epoch is counted once."""
    from types import SimpleNamespace

    from kd_lightning.engine.trainers import RunProgress

    def trainer(epoch: int, last_batch: bool) -> SimpleNamespace:
        progress = SimpleNamespace(is_last_batch=last_batch)
        loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
        return SimpleNamespace(
            current_epoch=epoch, fit_loop=loop, sanity_checking=False, is_global_zero=False
        )

    first = RunProgress({}, tmp_path / "results.json")
    first.on_train_start(trainer(0, False), None)
    first.on_train_epoch_start(trainer(0, False), None)
    first.on_train_epoch_end(
        trainer(0, False), None
    )  # epoch 0 done; results.json is written at epoch 1's start
    checkpoint: dict = {}
    first.on_save_checkpoint(trainer(1, True), None, checkpoint)  # epoch 1's checkpoint, saved at its end ...
    # ... and the run stops here: results.json still says one epoch, the checkpoint holds two
    second = RunProgress({}, tmp_path / "results.json")
    second.carry({"epoch_seconds": first.totals(0.0, 0)["epoch_seconds"], "attempts": 1}, epochs_kept=2)
    second.on_load_checkpoint(trainer(2, False), None, checkpoint)
    assert len(second.totals(0.0, 0)["epoch_seconds"]) == 2 and second.attempts == 2
    mid_epoch: dict = {}  # a mid-epoch checkpoint (SLURM's warning) holds the epochs before this one only
    first.on_save_checkpoint(trainer(1, False), None, mid_epoch)
    assert len(mid_epoch["kd_run_progress"]["epoch_seconds"]) == 1
