"""Factor Transfer and the pre-stage mechanism: FT's loss against its formula computed by hand, its
layers against RepDistiller's, and a real pre-stage that trains the paraphraser and nothing else."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.engine.prestage import run_pre_stages
from kd_lightning.errors import ConfigError
from kd_lightning.losses import create_loss

from .conftest import built_module

G = torch.Generator().manual_seed(0)


def _ft(s_shape, t_shape, **kw):
    return create_loss("ft", {"student_shape": s_shape, "teacher_shape": t_shape}, **kw)


@pytest.mark.parametrize(("s_shape", "t_shape"), [((4, 6, 6), (8, 3, 3)), ((4, 5), (6, 10))])
def test_ft_loss_is_the_mean_absolute_difference_of_normalised_squared_channel_means(s_shape, t_shape):
    ft = _ft(s_shape, t_shape).eval()
    s, t = torch.randn(3, *s_shape, generator=G), torch.randn(3, *t_shape, generator=G)
    fs, ft_ = ft.translator(s).double(), ft.paraphraser.encoder(t).double()
    # the larger factor map average-pooled to the smaller's size (by hand: block means)
    if fs.shape[2] > ft_.shape[2]:
        r = fs.shape[2] // ft_.shape[2]
        fs = (
            fs.unflatten(2, (ft_.shape[2], r)).mean(3)
            if fs.dim() == 3
            else fs.unfold(2, r, r).unfold(3, r, r).mean((4, 5))
        )
    elif fs.shape[2] < ft_.shape[2]:
        r = ft_.shape[2] // fs.shape[2]
        ft_ = ft_.unflatten(2, (fs.shape[2], r)).mean(3)
    total, count = 0.0, 0
    for i in range(3):
        a = [float((fs[i, :, ...].pow(2).mean(0)).flatten()[j]) for j in range(fs[0, 0].numel())]
        b = [float((ft_[i, :, ...].pow(2).mean(0)).flatten()[j]) for j in range(ft_[0, 0].numel())]
        na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
        for u, v in zip(a, b, strict=True):
            total += abs(u / na - v / nb)
            count += 1
    assert ft(s, t).item() == pytest.approx(total / count, rel=1e-4)


def test_ft_layers_are_repdistillers_and_the_paraphraser_is_frozen_outside_its_stage():
    ft = _ft((32, 8, 8), (64, 8, 8))  # k = 0.5: 32 factor channels
    conv = lambda a, b: a * b * 9 + b  # noqa: E731  (3 × 3 kernel + bias)
    assert sum(p.numel() for p in ft.paraphraser.parameters()) == (
        conv(64, 64) + conv(64, 32) + conv(32, 32) + conv(32, 32) + conv(32, 64) + conv(64, 64)
    )
    bn = lambda c: 2 * c  # noqa: E731
    assert sum(p.numel() for p in ft.translator.parameters()) == (
        conv(32, 32) + bn(32) + conv(32, 32) + bn(32) + conv(32, 32) + bn(32)
    )
    assert not any(p.requires_grad for p in ft.paraphraser.parameters())
    assert all(p.requires_grad for p in ft.translator.parameters())
    assert ft.pre_stage().epochs == 30 and ft.pre_stage().module is ft.paraphraser
    with pytest.raises(ConfigError, match="ft needs feature maps"):
        _ft((32,), (64,))


def test_the_pre_stage_trains_the_paraphraser_alone_and_the_fit_does_not(make_cfg):
    cfg = make_cfg("distill=ft", "student=cnn", "student.channels=[8,16]", "distill.terms.ft.init_epochs=2")
    module, dm = built_module(cfg, "digits")
    terms = module.objective.terms
    losses = {k: ft for term in terms.values() for k, ft in term.losses.items()}
    assert set(losses) == set(module.teachers.names)  # per_teacher: one paraphraser per teacher
    x = dm.prepare_batch(next(iter(dm.train_dataloader())), train=False).x
    feats = module.teachers(x)

    def recon() -> float:
        with torch.no_grad():
            return sum(
                float(F.mse_loss(ft.paraphraser(feats[k]["map"]), feats[k]["map"]))
                for k, ft in losses.items()
            )

    before = recon()
    student = {k: v.clone() for k, v in module.student.state_dict().items()}
    translators = {k: v.clone() for k, v in module.objective.state_dict().items() if "translator" in k}
    teachers = {k: v.clone() for k, v in module.teachers.state_dict().items()}
    out = run_pre_stages(module, dm, "cpu")
    assert out["pre_stage_terms"] == ["ft"] and set(out["pre_stage_last_loss_by_epochs"]) == {"2"}
    assert recon() < 0.8 * before  # the autoencoders learned the teachers' maps (1.29 → 0.84 in 2 epochs)
    after = module.objective.state_dict()
    assert all(torch.equal(v, module.student.state_dict()[k]) for k, v in student.items())
    assert all(torch.equal(v, after[k]) for k, v in translators.items())
    assert all(torch.equal(v, module.teachers.state_dict()[k]) for k, v in teachers.items())
    # frozen again: the main optimiser gets the translators but no paraphraser
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert not trainable & {id(p) for ft in losses.values() for p in ft.paraphraser.parameters()}
    assert {id(p) for ft in losses.values() for p in ft.translator.parameters()} <= trainable


def test_fsp_matches_the_flow_matrices_of_repdistiller_by_hand():
    from kd_lightning.losses.maps import FSP

    shapes = ((2, 4, 4), (3, 4, 4), (3, 2, 2))
    fsp = create_loss("fsp", {"student_shape": shapes, "teacher_shape": shapes})
    s = [torch.randn(2, *sh, generator=G) for sh in shapes]
    t = [torch.randn(2, *sh, generator=G) for sh in shapes]

    def flow(
        bottom: torch.Tensor, top: torch.Tensor
    ) -> list:  # one sample: G[j][i] = mean_p top_j(p) bottom_i(p)
        if bottom.shape[1] > top.shape[1]:  # block means, 2 × 2 → 1
            bottom = bottom.unfold(1, 2, 2).unfold(2, 2, 2).mean((3, 4))
        b, tp = bottom.flatten(1).double(), top.flatten(1).double()
        n = b.shape[1]
        return [
            [float(sum(tp[j, k] * b[i, k] for k in range(n))) / n for i in range(b.shape[0])]
            for j in range(tp.shape[0])
        ]

    expect = 0.0
    for k in range(2):  # the pairs (stem, stage1) and (stage1, stage2)
        sq = [
            (flow(s[k][i], s[k + 1][i])[j][c] - flow(t[k][i], t[k + 1][i])[j][c]) ** 2
            for i in range(2)
            for j in range(shapes[k + 1][0])
            for c in range(shapes[k][0])
        ]
        expect += sum(sq) / len(sq)
    assert fsp(s, t).item() == pytest.approx(expect, rel=1e-4)
    assert FSP.matrices(s)[0].shape == (2, 3, 2)
    stage = fsp.pre_stage()
    assert stage.student and stage.only and stage.module is None and stage.epochs == 30
    with pytest.raises(ConfigError, match="same channels"):
        create_loss("fsp", {"student_shape": shapes, "teacher_shape": ((4, 4, 4), *shapes[1:])})
    with pytest.raises(ConfigError, match="list of two or more"):
        create_loss("fsp", {"student_shape": (3, 4, 4), "teacher_shape": (3, 4, 4)})


def test_fsp_trains_the_students_feature_layers_in_its_pre_stage_and_the_fit_skips_it(tmp_path, cache_dir):
    """resnet56 → resnet20 (same widths) on a CIFAR-100-format fixture, the teacher from a released file."""
    from kd_lightning.models import create_model

    from .conftest import FAST_TRAINER, compose_cfg, write_cifar

    root = tmp_path / "cifar"
    write_cifar(root, 100, n_train=24, n_test=12)
    teacher = create_model({"name": "resnet56"}, 100, (3, 32, 32))
    released = tmp_path / "resnet56.pth"
    torch.save({"epoch": 240, "model": teacher.state_dict(), "best_acc": 70.0}, released)
    cfg = compose_cfg(
        [*FAST_TRAINER, "experiment=cifar100/resnet56_resnet20", f"data.root={root}", "data.num_workers=0",
         f"teachers.members.teacher.checkpoint={released}", "distill=fsp", "distill.terms.fsp.init_epochs=2"],
        tmp_path / "run", cache_dir,
    )  # fmt: skip
    module, dm = built_module(cfg, "cifar100")
    term = module.objective.terms["fsp"]
    assert term.student_tap == ["stem", "stage1", "stage2", "stage3"] and term.pre_stage_only
    assert not module.needs_teachers  # the fit reads no teacher feature: FSP acted in its pre-stage
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    t_before = {k: v.clone() for k, v in module.teachers.state_dict().items()}
    out = run_pre_stages(module, dm, "cpu")
    assert out["pre_stage_terms"] == ["fsp"]
    after = module.student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("layer") for k in changed) and "conv1.weight" in changed
    from kd_lightning.engine.prestage import PreStageModule, declared_pre_stages

    trained = {id(p) for p in PreStageModule(module, declared_pre_stages(module)).parameters_trained()}
    assert not trained & {id(p) for p in module.student.fc.parameters()}  # the classifier stays out
    assert {id(p) for p in module.student.layer1.parameters()} <= trained
    assert all(torch.equal(v, module.teachers.state_dict()[k]) for k, v in t_before.items())
    x = dm.prepare_batch(next(iter(dm.train_dataloader())), train=False).x
    _, parts = module.objective(module.taps(x), None, torch.zeros(len(x), dtype=torch.long))
    assert set(parts) == {"ce"}


def test_fsp_on_the_generic_cnn_names_the_channels_to_set_or_runs_when_they_match(make_cfg):
    """cnn declares its conv blocks as stages: FSP reads [stem, stage1, stage2] of it."""
    from kd_lightning.errors import ConfigError
    from kd_lightning.runners.run import run

    with pytest.raises(ConfigError, match=r"teacher 'cnn_s'.*stage1: 32 vs 16.*student.channels=\[16, 32\]"):
        run(make_cfg("distill=fsp", "student=cnn", "+trainer.fast_dev_run=true"))
    res = run(make_cfg("distill=fsp", "student=cnn", "student.channels=[16,32]", "teachers.use=[cnn_s]",
                       "distill.terms.fsp.init_epochs=1", "+trainer.fast_dev_run=true"))  # fmt: skip
    assert res["status"] == "ok" and res["pre_stage_terms"] == ["fsp"]
