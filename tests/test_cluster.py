"""What a cluster user meets first: ranks that a launcher started agree on whether a run starts (a refused
re-run ends on every node at once and changes nothing), and a launcher that starts another process count
than the Trainer expects is a one-line configuration error, at submit time and inside a job, before any
data is read. Two torchrun "nodes" on localhost with gloo stand in for two machines."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd_lightning.engine.launch import check_world, peers
from kd_lightning.errors import ConfigError
from kd_lightning.models import load_model

from .conftest import FAST, ROOT, run_cli
from .test_distributed import _env, _free_port


def _snapshot(run_dir: Path) -> dict[str, tuple[int, str]]:
    """Every file of a run folder but kd_lightning's own bookkeeping (.kd/): size and content."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and ".kd" not in p.relative_to(run_dir).parts
    }


def _torchrun_nodes(run_dir: Path, tmp_path: Path, cache_dir: Path, *overrides: str, nodes: int = 2):
    port = _free_port()
    env = {**os.environ, **_env(tmp_path, cache_dir), "KD_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    cmd = lambda rank: [  # noqa: E731
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc-per-node=1",
        f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "kd_lightning.train",
        *FAST, "trainer=multinode", f"hydra.run.dir={run_dir}", *overrides,
    ]  # fmt: skip
    return [
        subprocess.Popen(
            cmd(r), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for r in range(nodes)
    ]


@pytest.mark.multiprocess
def test_a_refused_rerun_ends_on_every_node_at_once_and_changes_nothing(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    first = _torchrun_nodes(run_dir, tmp_path, cache_dir)
    outs = [n.communicate(timeout=600)[0] for n in first]
    assert [n.returncode for n in first] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    before = _snapshot(run_dir)
    assert ".hydra/config.yaml" in before and "results.json" in before

    t0 = time.monotonic()
    nodes = _torchrun_nodes(run_dir, tmp_path, cache_dir)
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    seconds = time.monotonic() - t0
    assert all(n.returncode != 0 for n in nodes), outs
    said = [[ln for ln in out.splitlines() if ln.startswith("Configuration error:")] for out in outs]
    assert all(
        len(s) == 1 and "holds a finished run" in s[0] and "nothing was changed" in s[0] for s in said
    ), outs
    assert said[0] == said[1]  # the same line on both nodes
    assert "Initializing distributed" not in outs[1]  # rank 1 never waited for the process group
    assert seconds < 120, seconds
    assert _snapshot(run_dir) == before  # not a byte, not a time: .hydra, train.log, results.json

    # resume=auto: the finished run is skipped on both nodes, and still nothing changes
    nodes = _torchrun_nodes(run_dir, tmp_path, cache_dir, "resume=auto")
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    assert "already finished" in outs[1]
    after = _snapshot(run_dir)
    assert all(after[k] == before[k] for k in ("results.json", "student.pt", "checkpoints/last.ckpt"))


@pytest.mark.multiprocess
def test_a_launcher_that_starts_other_process_counts_is_a_one_line_error_before_the_data(tmp_path, cache_dir):
    """torchrun starts 2 processes, the Trainer expects devices × num_nodes = 1 (KD_NUM_NODES=1)."""
    run_dir = tmp_path / "run"
    port = _free_port()
    env = {**os.environ, **_env(tmp_path, cache_dir), "KD_ACCELERATOR": "cpu", "KD_NUM_NODES": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1",
         f"--master-port={port}", "-m", "kd_lightning.train", *FAST, "trainer=multinode", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = done.stdout + done.stderr
    said = [ln for ln in out.splitlines() if ln.startswith("Configuration error:")]
    assert len(said) == 2 and said[0] == said[1], out[-3000:]
    assert (
        "the launcher started 2 processes (torchrun's WORLD_SIZE)" in said[0]
        and "trainer.devices=1" in said[0]
    )
    workers = out.split("torch/distributed/elastic/multiprocessing/api.py")[0]  # before torchrun's own report
    assert "Traceback" not in workers and "data digits" not in out  # one line each, before the data was read


def test_the_world_check_reads_each_launchers_variables():
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    check_world({"devices": 4, "num_nodes": 2}, torchrun)
    check_world({"devices": "4", "num_nodes": 2}, torchrun)  # ${oc.env:KD_DEVICES_PER_NODE} is a string
    with pytest.raises(
        ConfigError, match=r"started 8 processes .* \(tasks per node: 4\), but trainer.devices=1"
    ):
        check_world({"devices": 1, "num_nodes": 2}, torchrun)
    slurm = {
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "3",
        "SLURM_NTASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NAME": "kd",
    }
    with pytest.raises(
        ConfigError, match=r"started 8 processes \(SLURM's SLURM_NTASKS\) \(tasks per node: 4\)"
    ):
        check_world({"devices": 1, "num_nodes": 1}, slurm)
    check_world({"devices": 1, "num_nodes": 1}, {**slurm, "SLURM_JOB_NAME": "interactive"})  # salloc's shell
    check_world({"devices": "auto", "num_nodes": 1}, torchrun)  # Lightning counts them itself


def test_ranks_of_an_srun_launch_share_a_verdict_through_the_run_folder(tmp_path):
    env = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_JOB_NAME": "kd"}
    leader, follower = (peers(tmp_path, {**env, "SLURM_PROCID": str(r)}) for r in (0, 1))
    from kd_lightning.engine import launch

    leader.publish(launch.Verdict(launch.REFUSE, "no"))
    assert follower.wait() == launch.Verdict(launch.REFUSE, "no")
    assert [p.name for p in (tmp_path / ".kd").iterdir()] == ["verdict-77.0.0.json"]
    assert peers(tmp_path, {**env, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # one task: no launch


def test_a_slurm_sweep_whose_tasks_do_not_match_the_trainer_is_refused_before_submitting(tmp_path):
    """Nothing reaches sbatch (there is none here): the error comes from composing the sweep."""
    done = run_cli("-m", "hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4",
                   "hydra.launcher.gpus_per_node=4", "trainer=multinode", "seed=0,1",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=ROOT)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "hydra.launcher.tasks_per_node=4 starts 4 processes per node, but trainer.devices=1" in done.stderr
    assert not (tmp_path / "sweep").exists()
    done = run_cli("-m", "hydra/launcher=slurm", "hydra.launcher.nodes=2", "trainer=ddp", "trainer.devices=1",
                   "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=ROOT)  # fmt: skip
    assert done.returncode == 2 and "hydra.launcher.nodes=2 but trainer.num_nodes=1" in done.stderr


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.multiprocess
def test_a_node_that_dies_leaves_the_survivor_two_lines_and_the_resume_command(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    nodes = _torchrun_nodes(run_dir, tmp_path, cache_dir, "trainer.max_epochs=40", "data.batch_size=8")
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and time.monotonic() < deadline and nodes[1].poll() is None:
        time.sleep(0.1)
    assert last.is_file(), "no checkpoint before the deadline"
    for worker in _children(nodes[1].pid):  # node 1's training process dies (as a node that loses power)
        os.kill(worker, signal.SIGKILL)
    survivor = nodes[0].communicate(timeout=300)[0]
    nodes[1].communicate(timeout=60)
    worker_lines = survivor.split("torch/distributed/elastic/multiprocessing/api.py")[
        0
    ]  # before torchrun's report
    assert "Traceback" not in worker_lines, worker_lines[-3000:]
    lines = [ln for ln in worker_lines.splitlines() if ln.strip()]
    first = next(i for i, ln in enumerate(lines) if ln.startswith("Training failed"))
    said = lines[first : first + 2]
    assert said[0].startswith("Training failed on rank 0: another rank of this run stopped"), said
    assert f"The last good checkpoint is {last}" in said[1] and "resume=auto" in said[1]
    assert f"hydra.run.dir={run_dir}" in said[1]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"


@pytest.mark.multiprocess
def test_the_local_submitit_launcher_runs_a_job_and_refuses_several_tasks(tmp_path, cache_dir):
    """Trying a SLURM sweep on one machine first: one job runs and leaves no folder named after a SLURM
    pattern; several tasks per node (which it would start as colliding copies of the job) are refused."""
    sweep = tmp_path / "sweep"
    env = _env(tmp_path, cache_dir)
    done = run_cli(
        "-m", "hydra/launcher=submitit_local", *FAST, "seed=0", f"hydra.sweep.dir={sweep}", cwd=ROOT, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((sweep / "0" / "results.json").read_text())["status"] == "ok"
    assert not list(sweep.rglob("%j"))
    done = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *FAST, "seed=0",
                   f"hydra.sweep.dir={tmp_path / 'two'}", cwd=ROOT, env=env)  # fmt: skip
    assert done.returncode == 2 and "runs each task as a separate copy of the job" in done.stderr
    assert not (tmp_path / "two").exists()


def test_a_slurm_sweep_needs_a_gpu_per_task(tmp_path):
    done = run_cli("-m", "hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4",
                   "trainer=multinode", "trainer.devices=4", "seed=0,1", f"hydra.sweep.dir={tmp_path}", cwd=ROOT)  # fmt: skip
    assert done.returncode == 2 and "hydra.launcher.gpus_per_node=1: each task trains on a GPU" in done.stderr


PREEMPTED_JOB = [*FAST, "data.batch_size=8", "trainer.max_epochs=3", "trainer.deterministic=true", "seed=3",
                 "logger=none", "callbacks.progress_bar=null"]  # fmt: skip


@pytest.mark.multiprocess
def test_slurms_warning_saves_a_mid_epoch_checkpoint_and_the_requeued_job_ends_as_if_never_stopped(
    tmp_path, cache_dir
):
    """SLURM sends SIGUSR2 before the time limit (submitit's `--signal=USR2@120`): the job saves where it is,
    in the middle of an epoch; the requeued job (SLURM_RESTART_COUNT=1) continues from that batch and ends
    with the weights of a job that was never stopped."""
    env = _env(tmp_path, cache_dir)
    reference = run_cli(*PREEMPTED_JOB, f"hydra.run.dir={tmp_path / 'reference'}", cwd=ROOT, env=env)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir = tmp_path / "job"
    slurm = {**os.environ, **env, "SLURM_JOB_ID": "4242", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "kd_lightning.train", *PREEMPTED_JOB, f"hydra.run.dir={run_dir}"]
    job = subprocess.Popen(
        cmd, cwd=ROOT, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    results = run_dir / "results.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None:  # into the second epoch
        if (
            results.is_file()
            and json.loads(results.read_text()).get("progress", {}).get("epochs_done", 0) >= 1
        ):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    assert job.poll() is None, "the job ended before the signal; make it longer"
    job.send_signal(signal.SIGUSR2)
    out = job.communicate(timeout=120)[0]
    assert job.returncode == 128 + signal.SIGUSR2, out[-3000:]
    assert "a checkpoint was saved mid-epoch" in out and "resume=auto" in out
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    [where] = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    train = json.loads((tmp_path / "reference" / "results.json").read_text())["train_samples"]
    assert where["epoch"] == ckpt["epoch"] >= 1 and 0 < where["samples"] < train  # in the middle of an epoch
    assert json.loads(results.read_text())["status"] == "interrupted"

    requeued = subprocess.run(cmd, cwd=ROOT, env={**slurm, "SLURM_RESTART_COUNT": "1"}, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "resuming" in requeued.stdout + requeued.stderr
    a, b = (load_model(d / "student.pt") for d in (tmp_path / "reference", run_dir))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    r, ref = (json.loads((d / "results.json").read_text()) for d in (run_dir, tmp_path / "reference"))
    assert r["status"] == "ok" and r["test_acc"] == pytest.approx(ref["test_acc"], abs=1e-6)
