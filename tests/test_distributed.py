"""KD under DDP on CPU (gloo): two processes, a multirun of DDP jobs, a 2-node torchrun over loopback,
bf16 autocast, and 2×b DDP vs 1×2b equivalence. GPU paths (NCCL, 16-mixed) are not exercised here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning.engine.build import build_module, build_teacher_ensemble
from kd_lightning.engine.distributed import num_nodes_from_env, ranks_argv, spawns_children
from kd_lightning.errors import ConfigError
from kd_lightning.models import load_model

from .conftest import FAST, FAST_TRAINER, ROOT, built_data, run_cli

DDP = ["trainer=ddp_cpu", "trainer.devices=2"]
# a train set of 1024 = 16 steps of 64: DDP's sampler pads nothing, so 2×32 and 1×64 see the same batches
EQUIV = [
    "data.train_subset=1024",
    "trainer.max_epochs=3",
    "scheduler=none",
    "callbacks=none",
    "trainer.deterministic=true",
]


def _env(tmp_path: Path, cache_dir: Path) -> dict:
    return {
        "KD_OUTPUT_ROOT": str(tmp_path / "outputs"),
        "KD_CACHE_DIR": str(cache_dir),
        "OMP_NUM_THREADS": "1",
    }


def _results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) | {"_dir": str(p.parent)} for p in sorted(root.rglob("results.json"))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_num_nodes_from_env(monkeypatch):
    for k in ("KD_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert num_nodes_from_env() == 1
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert num_nodes_from_env() == 2
    monkeypatch.setenv("SLURM_NNODES", "3")
    assert num_nodes_from_env() == 3
    monkeypatch.setenv("KD_NUM_NODES", "5")
    assert num_nodes_from_env() == 5


def test_who_spawns_ranks(monkeypatch):
    for k in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert spawns_children({"strategy": "ddp", "devices": 2})
    assert not spawns_children({"strategy": "ddp", "devices": 1})
    assert not spawns_children({"strategy": "ddp_spawn", "devices": 2})
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert not spawns_children({"strategy": "ddp", "devices": 2})


def test_torchrun_and_srun_ranks_must_share_a_folder():
    env = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "RANK": "1"}
    with pytest.raises(ConfigError, match=r"under torchrun every rank .* hydra.run.dir=<"):
        ranks_argv(["seed=1"], env)
    assert ranks_argv(["hydra.run.dir=/x"], env) == ["hydra.output_subdir=null"]  # rank 0 writes .hydra/
    assert ranks_argv(["hydra.run.dir=/x"], {**env, "RANK": "0"}) == []
    with pytest.raises(ConfigError, match="hydra.sweep.dir"):
        ranks_argv(["-m", "hydra.run.dir=/x"], env)
    srun = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_NAME": "kd"}
    with pytest.raises(ConfigError, match=r"under srun every rank"):
        ranks_argv(["seed=1"], srun)
    assert ranks_argv(["hydra.run.dir=/x"], srun) == ["hydra.output_subdir=null"]
    assert ranks_argv(["seed=1"], {**srun, "SLURM_NTASKS": "1"}) == []  # one task: an ordinary run


def test_every_launcher_names_the_logs_by_rank(monkeypatch):
    from kd_lightning.config.resolvers import log_name

    for k in ("RANK", "SLURM_NTASKS", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert log_name("train") == "train.log"
    for env in ({"RANK": "3"}, {"SLURM_NTASKS": "4", "SLURM_PROCID": "3"}, {"LOCAL_RANK": "3"}):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert log_name("train_ddp_process_3") == "train_rank3.log"


@pytest.mark.multiprocess
def test_ddp_two_processes_one_folder_rank0_writes(tmp_path, cache_dir):
    # verbose=true: Lightning's own lines (hidden by default) say how many processes it started
    proc = run_cli(*FAST, *DDP, "baseline=true", "verbose=true", cwd=ROOT, env=_env(tmp_path, cache_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Starting with 2 processes" in proc.stderr + proc.stdout
    [r] = _results(tmp_path / "outputs")  # one results.json, written by rank 0
    job = Path(r["_dir"])
    assert (
        r["status"] == "ok" and 0 <= r["test_acc"] <= 1 and set(r["teacher_test_acc"]) == {"cnn_s", "cnn_l"}
    )
    assert "baseline_test_acc" in r
    assert [p.parent for p in (tmp_path / "outputs").rglob(".hydra")] == [job]  # no second Hydra folder
    assert (job / "train_rank1.log").exists() and (job / "student.pt").exists()  # logs named by rank
    assert not list(job.glob("train_ddp_process_*.log"))
    ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if "teacher" in k]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_multirun_of_ddp_jobs(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m", *FAST, *DDP, "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=ROOT, env=_env(tmp_path, cache_dir)
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rs = _results(sweep)
    assert sorted(r["seed"] for r in rs) == [0, 1] and all(r["status"] == "ok" for r in rs)
    assert sorted(Path(r["_dir"]).name for r in rs) == ["0", "1"]
    assert not (tmp_path / "outputs").exists(), "a DDP child started a run folder of its own"


@pytest.mark.multiprocess
def test_two_nodes_over_loopback_with_torchrun(tmp_path, cache_dir):
    run_dir, port = tmp_path / "run", _free_port()
    env = {**os.environ, **_env(tmp_path, cache_dir), "KD_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    cmd = lambda rank: [  # noqa: E731
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
        "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "kd_lightning.train",
        *FAST, "trainer=multinode", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    nodes = [
        subprocess.Popen(
            cmd(r), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for r in (0, 1)
    ]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1]
    [r] = _results(run_dir)
    assert r["status"] == "ok" and (run_dir / "student.pt").exists()
    assert list(run_dir.rglob(".hydra")) == [run_dir / ".hydra"]
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["train.log", "train_rank1.log"]


def test_bf16_mixed_on_cpu_teachers_under_autocast(make_cfg, cache_dir):
    import pytorch_lightning as pl

    cfg = make_cfg("trainer.precision=bf16-mixed", "distill=[feature,kd]")
    spec, dm = built_data(cfg)
    teachers = build_teacher_ensemble(spec, dm)
    module = build_module(spec, dm, teachers)
    seen: dict[str, torch.dtype] = {}
    teacher = teachers.members["cnn_l"]

    def record(module, inputs, output) -> None:  # a hook that returns None leaves the output alone
        seen.setdefault("teacher", output.dtype)

    teacher.fc.register_forward_hook(record)
    losses = []
    orig = module.objective.forward
    module.objective.forward = lambda *a, **k: (lambda out: (losses.append(out[0].dtype), out)[1])(
        orig(*a, **k)
    )
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert seen["teacher"] == torch.bfloat16  # the teachers ran under the trainer's autocast
    assert losses and all(d == torch.float32 for d in losses)  # KL / cosine / MSE reduced in fp32


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_2x_b_matches_1x_2b(tmp_path, cache_dir):
    """Same seed, same global batches: the students end within a small tolerance of each other."""
    one = run_cli(
        *FAST,
        *EQUIV,
        "data.batch_size=64",
        "hydra.run.dir=" + str(tmp_path / "one"),
        cwd=ROOT,
        env=_env(tmp_path, cache_dir),
    )
    two = run_cli(
        *FAST,
        *EQUIV,
        *DDP,
        "data.batch_size=32",
        "hydra.run.dir=" + str(tmp_path / "two"),
        cwd=ROOT,
        env=_env(tmp_path, cache_dir),
    )
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-4000:]
    a, b = load_model(tmp_path / "one" / "student.pt"), load_model(tmp_path / "two" / "student.pt")
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert diff < 1e-4, f"weights differ by {diff}"
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert abs(ra["test_acc"] - rb["test_acc"]) <= 0.005, (ra["test_acc"], rb["test_acc"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_precompute_shards_the_store_once_and_a_second_run_runs_no_teacher(tmp_path, cache_dir):
    """Each rank fills about half the rows, then nobody runs a teacher on training data; the student equals
    a live-teacher run of the same seed (DDP-equivalence tolerance); a second run runs no teacher at all."""
    stores = tmp_path / "stores"
    base = [*FAST, *EQUIV, *DDP, "data.batch_size=32"]
    runs = {}
    for name, cache in (("live", "none"), ("first", "disk"), ("second", "disk")):
        proc = run_cli(
            *base,
            f"teacher_cache.mode={cache}",
            f"teacher_cache.dir={stores}",
            f"hydra.run.dir={tmp_path / name}",
            cwd=ROOT,
            env=_env(tmp_path, cache_dir),
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    n = runs["first"]["train_samples"]
    first = runs["first"]["teacher_forward_samples_by_rank"]
    assert len(first) == 2 and sum(first) == 2 * n  # two teachers, every sample once, no live pass after
    assert abs(first[0] - first[1]) <= 2  # each rank its half
    assert runs["live"]["teacher_forward_samples"] == 3 * 2 * n  # three epochs live, for comparison
    assert runs["second"]["teacher_forward_samples_by_rank"] == [0, 0]
    files = runs["first"]["teacher_store_files"]
    assert len(files) == 2 and files == runs["second"]["teacher_store_files"]
    assert all(Path(f).is_file() for f in files) and len(list(stores.rglob("*.bin"))) == 2  # written once
    live, stored = (load_model(tmp_path / d / "student.pt") for d in ("live", "first"))
    diff = max(
        (p - q).abs().max().item() for p, q in zip(live.parameters(), stored.parameters(), strict=True)
    )
    assert diff < 1e-4, f"weights differ by {diff}"


@pytest.mark.multiprocess
def test_ddp_fills_each_recorded_view_of_an_image_folder_once(tmp_path, cache_dir):
    """data.train_transforms with data.augment.views=3 under two processes: the ranks split the (image, view)
    rows of the disk store between them, each row computed once, and no teacher runs during training."""
    from .test_data import write_png_classes
    from .test_views import CROP_FLIP, EVAL, _hydra

    root = write_png_classes(tmp_path / "images", ["a", "b", "c"], 8, size=14)
    proc = run_cli(
        *FAST_TRAINER, *DDP, "data=imagefolder", f"data.root={root}", "data.image_size=null",
        f"data.train_transforms={_hydra(CROP_FLIP)}", f"data.eval_transforms={_hydra(EVAL)}",
        "data.augment={views: 3}", "data.batch_size=8", "student=cnn", "teachers.use=[cnn_s]",
        "teachers.members.cnn_s.fit.max_epochs=1", "distill=kd", "teacher_cache.mode=disk",
        f"teacher_cache.dir={tmp_path / 'stores'}", f"hydra.run.dir={tmp_path / 'run'}",
        cwd=ROOT, env=_env(tmp_path, cache_dir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    by_rank = r["teacher_forward_samples_by_rank"]
    assert len(by_rank) == 2 and sum(by_rank) == 3 * r["train_samples"]  # every view once, none live
    assert abs(by_rank[0] - by_rank[1]) <= 1
    assert [Path(f).with_suffix(".filled").exists() for f in r["teacher_store_files"]] == [True]
