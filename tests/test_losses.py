import math

import pytest
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.losses import create_loss, list_losses

S = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
T = torch.tensor([[0.0, 2.0], [2.0, 1.0]])


def test_mse_l1_by_hand():
    # differences: 1, 0, -2, -2
    assert create_loss("mse")(S, T).item() == pytest.approx((1 + 0 + 4 + 4) / 4)
    assert create_loss("l1")(S, T).item() == pytest.approx((1 + 0 + 2 + 2) / 4)


def test_smooth_l1_by_hand():
    # beta=1: |d|<1 → 0.5 d²; else |d| - 0.5. d = 1, 0, 2, 2 → 0.5, 0, 1.5, 1.5
    assert create_loss("smooth_l1", beta=1.0)(S, T).item() == pytest.approx((0.5 + 0 + 1.5 + 1.5) / 4)


def test_cosine_by_hand():
    cos1 = (1 * 0 + 2 * 2) / (math.sqrt(5) * 2)
    cos2 = (0 * 2 + -1 * 1) / (1 * math.sqrt(5))
    assert create_loss("cosine")(S, T).item() == pytest.approx(((1 - cos1) + (1 - cos2)) / 2, rel=1e-6)


def test_kl_hinton_by_hand():
    temp = 2.0
    total = 0.0
    for s, t in zip(S.tolist(), T.tolist()):
        ps = [math.exp(v / temp) for v in s]
        pt = [math.exp(v / temp) for v in t]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    expected = total / 2 * temp**2
    assert create_loss("kl", temperature=temp)(S, T).item() == pytest.approx(expected, rel=1e-5)
    assert create_loss("kd", temperature=temp)(S, T).item() == pytest.approx(expected, rel=1e-5)


def test_distances_are_zero_at_the_target():
    for name in ("mse", "l1", "smooth_l1", "cosine", "kl"):
        assert create_loss(name)(T, T).item() == pytest.approx(0.0, abs=1e-6), name


def test_registry_errors_are_clear():
    assert {"mse", "l1", "smooth_l1", "cosine", "kl", "kd"} <= set(list_losses())
    with pytest.raises(ConfigError, match="unknown distance/loss 'msee'.*mse"):
        create_loss("msee")
    with pytest.raises(ConfigError, match="temperatur.*valid options: standardize, temperature"):
        create_loss("kl", temperatur=3)
    with pytest.raises(ConfigError, match="positive"):
        create_loss("kl", temperature=0)


def test_soft_mse_regresses_onto_teacher_probabilities():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    loss = create_loss("soft_mse", temperature=2.0)
    by_hand = sum(((s[i] - torch.softmax(t[i] / 2.0, 0)) ** 2).sum() for i in range(4)) / 20
    torch.testing.assert_close(loss(s, t), by_hand)
    with pytest.raises(ConfigError, match="temperature"):
        create_loss("soft_mse", temperature=0.0)


class _Scaled(torch.nn.Module):
    """A loss of a user's own: one option, `scale`."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, s, t):
        return self.scale * (s - t).pow(2).mean()


def test_a_loss_of_your_own_has_its_options_checked_before_any_teacher_is_fitted(make_cfg, monkeypatch):
    from kd_lightning.losses.registry import _LOSSES, register_loss
    from kd_lightning.runners import distill
    from kd_lightning.runners.run import run

    def no_teachers_yet(*a, **k):
        raise AssertionError("the teachers were built before the options were checked")

    monkeypatch.setattr(distill, "build_teacher_ensemble", no_teachers_yet)
    register_loss("tests_scaled")(_Scaled)
    try:
        cfg = make_cfg("distill=kd", "distill.terms.kd.distance=tests_scaled", "~distill.terms.kd.temperature",
                       "+distill.terms.kd.sclae=3")  # fmt: skip
        with pytest.raises(ConfigError, match=r"distill.terms.kd: loss 'tests_scaled' got unknown option\(s\) "
                           r"\['sclae'\] \('sclae': did you mean 'scale'\?\); valid options: scale"):  # fmt: skip
            run(cfg)
    finally:
        del _LOSSES["tests_scaled"]
