"""hydra/launcher=packed: jobs that differ only in teachers and terms train fused in one process, each equal
to the job run alone, each in its own folder; the others run alone, saying why."""

import json
import os

import pytest
import torch

from kd_lightning.config.request import read_request
from kd_lightning.runners.packed import plan_packs, run_pack
from kd_lightning.runners.run import run

from .conftest import FAST, ROOT, compose_cfg, run_cli

USES = ["[cnn_s]", "[cnn_l]", "[cnn_s,cnn_l]", "[]"]  # concat adapters of three sizes, and no teacher at all


def _requests(root, cache_dir, *extra):
    return [
        read_request(compose_cfg([*FAST, f"teachers.use={u}", *extra], root / str(i), cache_dir))
        for i, u in enumerate(USES)
    ]


def _weights(results):
    return torch.load(results["student_path"], weights_only=True)["state_dict"]


def test_packed_jobs_train_as_they_would_alone(tmp_path, cache_dir):
    """Four digits jobs (three teacher subsets, concat adapters of different sizes, and the no-teacher
    control) packed: each job's student ends with the weights it ends with alone (float tolerance; on this
    CPU they are bitwise equal), so the same val and test accuracies; each folder has its own results
    (packed_with the other three); resume=auto then repeats none of them."""
    alone = [run(r) for r in _requests(tmp_path / "alone", cache_dir)]
    requests = _requests(tmp_path / "packed", cache_dir)
    plan = plan_packs(requests)
    assert plan.packs == [[0, 1, 2, 3]] and plan.alone == {}
    packed = run_pack(requests)
    for a, p in zip(alone, packed, strict=True):
        assert p["status"] == "ok" and p["teacher_set"] == a["teacher_set"]
        assert len(p["packed_with"]) == 3 and p["output_dir"] not in p["packed_with"]
        wa, wp = _weights(a), _weights(p)
        assert all(torch.allclose(wa[k], wp[k], rtol=1e-5, atol=1e-6) for k in wa), a["teacher_set"]
        for key in ("val_acc", "test_acc", "last_test_acc"):
            assert p[key] == pytest.approx(a[key], abs=1e-6), (a["teacher_set"], key)
        assert p["teacher_test_acc"] == pytest.approx(a["teacher_test_acc"])
        on_disk = json.loads((tmp_path / "packed" / str(packed.index(p)) / "results.json").read_text())
        assert on_disk["status"] == "ok" and on_disk["packed_with"] == p["packed_with"]
    again = run_pack(_requests(tmp_path / "packed", cache_dir, "resume=auto"))
    assert [r["run_started"] for r in again] == [r["run_started"] for r in packed]  # nothing trained again


def test_jobs_that_cannot_pack_are_told_why(tmp_path, cache_dir):
    """A job that needs a run of its own (gradient clipping, another runner, a lone setting) is planned
    alone, with the reason the launcher prints."""

    def request(i, *extra):
        return read_request(compose_cfg([*FAST, *extra], tmp_path / str(i), cache_dir))

    plan = plan_packs([
        request(0, "teachers.use=[cnn_s]"),
        request(1, "teachers.use=[cnn_l]"),
        request(2, "teachers.use=[cnn_l]", "+trainer.gradient_clip_val=1.0"),
        request(3, "teachers.use=[cnn_l]", "optim.lr=0.01"),
        request(4, "teachers.use=[cnn_l]", "test_each_epoch=true"),
        request(5, "teachers.use=[cnn_s]", "seed=1"),
        request(6, "teachers.use=[cnn_l]", "seed=1"),
        request(7, "teachers.use=[cnn_l]", "+distill.terms.feat.no_such_option=1"),
    ])  # fmt: skip
    assert plan.packs == [[0, 1], [5, 6]]  # another seed, another batch order: a pack of its own
    assert "gradient_clip_val" in plan.alone[2]
    assert "shares its settings" in plan.alone[3]
    assert "test_each_epoch" in plan.alone[4]
    assert "no_such_option" in plan.alone[7]  # it fails alone, with its own message, not the pack


@pytest.mark.multiprocess
def test_the_packed_launcher_runs_a_teacher_subset_sweep(tmp_path, cache_dir):
    """kd-train -m ... hydra/launcher=packed: the subset sweep of landro2021 trains as one pack (one line
    says so), every job in its own folder marked packed_with; a job crossed with a setting that cannot pack
    runs alone, saying why."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "experiment=landro2021",
        "sweep=teacher_subsets",
        "sweep_min_teachers=2",
        "hydra/launcher=packed",
        "data.num_samples=1000",
        "trainer.max_epochs=1",
        "test_each_epoch=false,true",
        "teachers.members.cnn_a.fit.max_epochs=1",
        "teachers.members.cnn_b.fit.max_epochs=1",
        "teachers.members.cnn_c.fit.max_epochs=1",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "print_summary=false",
        f"hydra.sweep.dir={sweep}",
        cwd=ROOT,
        env={"KD_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rs = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert len(rs) == 8 and all(r["status"] == "ok" for r in rs.values())
    packed = [r for r in rs.values() if r.get("packed_with")]
    assert len(packed) == 4 and all(len(r["packed_with"]) == 3 for r in packed)
    assert sorted(r["teacher_set"] for r in packed) == [
        "cnn_a+cnn_b",
        "cnn_a+cnn_b+cnn_c",
        "cnn_a+cnn_c",
        "cnn_b+cnn_c",
    ]
    log = proc.stdout + proc.stderr
    assert log.count("train together") == 1 and log.count("runs alone: test_each_epoch=true") == 4


def test_an_interrupted_pack_continues_from_its_checkpoint(tmp_path, cache_dir):
    """resume=auto on a pack whose jobs did not finish: the pack continues from its own last.ckpt (the epoch
    done is not trained again: each job's validation curve holds it, then the next)."""

    def requests(*extra):
        return [
            read_request(compose_cfg([*FAST, f"teachers.use={u}", *extra], tmp_path / str(i), cache_dir))
            for i, u in enumerate(["[cnn_s]", "[cnn_l]"])
        ]

    first = run_pack(requests("trainer.max_epochs=1"))
    checkpoint = first[0]["pack_checkpoint"]
    assert checkpoint == first[1]["pack_checkpoint"] and os.path.isfile(checkpoint)
    for i, r in enumerate(first):  # as a stop during the fit leaves them
        (tmp_path / str(i) / "results.json").write_text(json.dumps({**r, "status": "interrupted"}))
    again = run_pack(
        requests("trainer.max_epochs=2", "resume=auto", "resume_accept=[trainer.max_epochs,scheduler.T_max]")
    )
    for before, after in zip(first, again, strict=True):
        assert after["status"] == "ok" and after["resumed_from"] == checkpoint
        assert len(before["val_curve"]) == 1 and len(after["val_curve"]) == 2
        assert after["val_curve"][0] == before["val_curve"][0]


def test_a_convolutional_student_with_batch_norm_packs_to_float_rounding(tmp_path, cache_dir):
    """A CNN student (batch norm: its running statistics stacked and updated under vmap) over its first
    steps: packed, each job's weights and statistics are the job's alone to float rounding (a batched
    convolution rounds differently from one at a time)."""
    steps = ["student=cnn", "trainer.max_epochs=1", "+trainer.limit_train_batches=3"]
    alone = [run(r) for r in _requests(tmp_path / "alone", cache_dir, *steps)[:3]]
    packed = run_pack(_requests(tmp_path / "packed", cache_dir, *steps)[:3])
    for a, p in zip(alone, packed, strict=True):
        wa, wp = _weights(a), _weights(p)
        assert any("running_mean" in k for k in wa)
        assert all(torch.allclose(wa[k].float(), wp[k].float(), rtol=1e-5, atol=1e-6) for k in wa)
