"""Ye et al. 2019 amalgamation: config checks, multi-task model files, channel filtering, no labels."""

import pytest
import torch

from kd_lightning.data import DigitsDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.runners.amalgamation import (
    BlockStage,
    MultiTaskNet,
    check_amalgamation_cfg,
    fit_or_load_teacher,
    load_multitask,
    run_amalgamation,
    save_multitask,
    task_labels,
    taylor_channel_weights,
)

TEACHERS = {
    "a": {"tasks": ["digit", "parity"], "channels": [8, 8], "fit": {"max_epochs": 2, "seed": 1}},
    "b": {
        "tasks": ["ge5", "mod3"],
        "channels": [8, 8],
        "kernel_size": 3,
        "fit": {"max_epochs": 2, "seed": 2},
    },
}
CFG = {
    "tasks": ["parity", "ge5"],
    "teachers": TEACHERS,
    "student": {"channels": [4, 4]},
    "block_epochs": 1,
    "head_epochs": 1,
    "finetune_epochs": 1,
}


def test_task_labels_from_digits():
    y = torch.arange(10)
    assert task_labels("parity", y).tolist() == [0, 1] * 5
    assert task_labels("ge5", y).tolist() == [0] * 5 + [1] * 5
    assert task_labels("mod3", y).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": ["parity", "color"]}, "unknown task"),
        ({"tasks": ["parity", "parity"]}, "repeats"),
        ({"teachers": {"a": TEACHERS["a"]}}, r"tasks \['ge5'\] are held by no teacher"),
        ({"student": {"channels": [4, 4, 4]}}, "as many blocks as every teacher"),
        ({"filter": "magic"}, "filter"),
        ({"epochs": 3}, "unknown key"),
        ({"head_epochs": 0}, "heads untrained after its blocks"),
        ({"block_epochs": 0, "head_epochs": 0, "finetune_epochs": 0}, "heads never train"),
        ({"block_stage": "magic"}, "block_stage"),
        ({"block_stage": "entangled", "block_epochs": 0, "head_epochs": 0}, "block_stage=entangled .* skips"),
    ],
)
def test_bad_amalgamation_settings_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        check_amalgamation_cfg({**CFG, **change})


def test_multitask_file_round_trip_and_refuses_other_files(tmp_path):
    m = MultiTaskNet((1, 8, 8), ["digit", "parity"], [4, 4])
    save_multitask(m, tmp_path / "m.pt", (1, 8, 8), {"note": 1})
    back = load_multitask(tmp_path / "m.pt")
    x = torch.randn(3, 1, 8, 8)
    m.eval(), back.eval()
    for task, out in m(x).items():
        torch.testing.assert_close(back(x)[task], out)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="multi-task model file"):
        load_multitask(tmp_path / "other.pt")


def test_taylor_filter_gives_no_weight_to_a_channel_the_chosen_task_ignores():
    torch.manual_seed(0)
    t = MultiTaskNet((1, 16), ["parity", "digit"], [4, 3])
    last = t.blocks[-1](t.blocks[0](torch.zeros(1, 1, 16))).shape[-1]  # positions per channel
    with torch.no_grad():
        t.heads["parity"].weight[:, last : 2 * last] = 0  # channel 1 of the last block: not used for parity
    w = taylor_channel_weights(t, 1, ["parity"], [torch.randn(64, 1, 16)])
    assert w.shape == (3,) and w.mean() == pytest.approx(1.0) and bool((w >= 0).all())
    assert w[1] == 0 and w[0] > 0 and w[2] > 0
    w_digit = taylor_channel_weights(t, 1, ["digit"], [torch.randn(64, 1, 16)])
    assert w_digit[1] > 0  # the other task does use it


def test_block_stage_trains_only_the_student_block_and_projections():
    s = MultiTaskNet((1, 16), ["parity"], [4, 4])
    teacher = MultiTaskNet((1, 16), ["parity"], [6, 6]).requires_grad_(False)
    stage = BlockStage(s, 1, {"t": teacher}, {"t": torch.ones(6)}, lr=0.01)
    trained = {id(p) for p in stage._params}
    assert trained == {id(p) for p in [*s.blocks[1].parameters(), *stage.projections.parameters()]}
    assert not trained & {id(p) for p in teacher.parameters()}


def test_entangled_block_stage_is_feature_error_plus_kl_through_the_teachers_remaining_layers():
    """The loss by hand: the filtered feature error, plus T² KL between the teacher's chosen heads run on the
    (attended, projected) student features and on its own features; gradients reach the student block, the
    projection and the attention, never the teacher."""
    torch.manual_seed(0)
    s = MultiTaskNet((1, 16), ["parity"], [4, 4, 4])
    teacher = MultiTaskNet((1, 16), ["digit", "parity"], [6, 6, 6]).eval().requires_grad_(False)
    w = torch.rand(6) + 0.5
    stage = BlockStage(s, 1, {"t": teacher}, {"t": w}, lr=0.01, tasks={"t": ["parity"]}, temperature=2.0)
    assert {id(p) for p in stage._params} == {
        id(p) for m in (s.blocks[1], stage.projections, stage.attention) for p in m.parameters()
    }
    x = torch.randn(8, 1, 16)
    loss = stage.training_step((x,), 0)

    p = stage.projections["t"](stage.attention["t"](s.blocks[1](s.blocks[0](x))))
    t = teacher.trunk(x, 2)
    by_hand = (w.view(1, -1, 1) * (p - t) ** 2).mean()
    out_s = teacher.heads["parity"](teacher.blocks[2](p).flatten(1)) / 2
    out_t = teacher.heads["parity"](teacher.blocks[2](t).flatten(1)) / 2
    kl = (out_t.softmax(1) * (out_t.log_softmax(1) - out_s.log_softmax(1))).sum(1).mean()
    torch.testing.assert_close(loss, by_hand + 4 * kl)
    loss.backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in stage.attention.parameters())
    assert all(q.grad is None for q in teacher.parameters())
    plain = BlockStage(s, 1, {"t": teacher}, {"t": w}, lr=0.01)  # projection: no attention, no KL
    assert not list(plain.attention.parameters())


def _run_spec(amalgamation: dict, tmp_path):
    """The RunSpec of an amalgamation run on digits, its teachers cached under tmp_path."""
    from kd_lightning.config.run_spec import parse_run

    return parse_run(
        {
            "amalgamation": amalgamation,
            "data": {"_target_": "DigitsDataModule"},
            "trainer": {"accelerator": "cpu", "max_epochs": 1},
            "paths": {"cache_dir": str(tmp_path), "output_dir": str(tmp_path / "out")},
            "seed": 0,
        }
    )


def test_the_student_never_uses_labels(tmp_path):
    """Same seed, training labels shuffled after the teachers were fitted: the very same student."""
    spec_of_run = _run_spec(CFG, tmp_path)
    data_cfg = {"_target_": "DigitsDataModule"}
    results = []
    for shuffle in (False, True):
        dm = DigitsDataModule(batch_size=128)
        dm.setup()
        a = check_amalgamation_cfg(CFG)
        spec = a.teachers
        for name in spec:  # the teachers are fitted (with labels) before any shuffling, then cached
            fit_or_load_teacher(name, spec[name], dm, data_cfg, tmp_path, "cpu")
        if shuffle:
            y = dm.splits["train"].y
            dm.splits["train"].y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
        results.append(run_amalgamation(a, spec_of_run, dm, tmp_path / f"out{int(shuffle)}"))
    assert results[0]["task_acc"] == results[1]["task_acc"]
    assert set(results[0]["task_acc"]) == {"parity", "ge5"}
    assert set(results[0]["teacher_test_acc"]) == {"a:parity", "b:ge5"}
    s0, s1 = (load_multitask(tmp_path / f"out{i}" / "student.pt").state_dict() for i in (0, 1))
    for k, v in s0.items():
        torch.testing.assert_close(s1[k], v)


@pytest.mark.parametrize(
    "override,named",
    [("baseline=true", "baseline=true"), ("evaluate=robustness", "evaluate"), ("perf.compile=true", "perf")],
)
def test_settings_the_amalgamation_runner_would_ignore_are_refused(make_cfg, override, named):
    from kd_lightning.runners.run import run

    with pytest.raises(ConfigError, match=f"runner=amalgamation does not use .*{named}"):
        run(make_cfg("experiment=ye2019", "dry_run=true", override, fast=False))


def test_amalgamation_dry_run_builds_nothing(make_cfg):
    from kd_lightning.runners.run import run

    assert run(make_cfg("experiment=ye2019", "dry_run=true", fast=False))["status"] == "dry_run"


def test_end_to_end_only_skips_the_layer_wise_stages_and_fit_seed_refits_the_teachers(tmp_path, monkeypatch):
    import kd_lightning.runners.amalgamation as am

    def no_stage(*args, **kwargs):
        raise AssertionError("block stage ran with block_epochs=0")

    monkeypatch.setattr(am, "BlockStage", no_stage)
    monkeypatch.setattr(am, "taylor_channel_weights", no_stage)
    dm = DigitsDataModule(batch_size=128)
    dm.setup()
    results = []
    for fit_seed in (0, 1):
        plain = {**CFG, "block_epochs": 0, "head_epochs": 0, "finetune_epochs": 1, "fit_seed": fit_seed}
        a = check_amalgamation_cfg(plain)
        results.append(run_amalgamation(a, _run_spec(plain, tmp_path), dm, tmp_path / f"out{fit_seed}"))
    assert [r["teacher_fit_seed"] for r in results] == [0, 1]
    for name in TEACHERS:
        paths = [r["teacher_checkpoints"][name] for r in results]
        assert paths[0] != paths[1]  # another fit, cached apart
        w0, w1 = (load_multitask(p).state_dict() for p in paths)
        assert any(not torch.equal(w0[k], w1[k]) for k in w0)
