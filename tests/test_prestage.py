"""Factor Transfer and the pre-stage mechanism: FT's loss against its formula computed by hand, its
layers against RepDistiller's, and a real pre-stage that trains the paraphraser and nothing else."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from kd_lightning.build import build_module, build_teacher_ensemble, instantiate_datamodule
from kd_lightning.errors import ConfigError
from kd_lightning.losses import create_loss
from kd_lightning.prestage import run_pre_stages

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
    pl.seed_everything(0)
    dm = instantiate_datamodule(cfg.data)
    dm.setup("fit")
    module = build_module(cfg, dm, build_teacher_ensemble(cfg, dm, "digits"))
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
    assert out["pre_stage_terms"] == ["ft"] and set(out["pre_stage_last_loss_by_epochs"]) == {2}
    assert recon() < 0.8 * before  # the autoencoders learned the teachers' maps (1.29 → 0.84 in 2 epochs)
    after = module.objective.state_dict()
    assert all(torch.equal(v, module.student.state_dict()[k]) for k, v in student.items())
    assert all(torch.equal(v, after[k]) for k, v in translators.items())
    assert all(torch.equal(v, module.teachers.state_dict()[k]) for k, v in teachers.items())
    # frozen again: the main optimiser gets the translators but no paraphraser
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert not trainable & {id(p) for ft in losses.values() for p in ft.paraphraser.parameters()}
    assert {id(p) for ft in losses.values() for p in ft.translator.parameters()} <= trainable
