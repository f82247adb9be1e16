import pytest
import torch
import torch.nn.functional as F

from kd_lightning.config.run_spec import parse_distill
from kd_lightning.config.specs import TermSpec
from kd_lightning.core.objective import Objective, Term, build_objective
from kd_lightning.errors import ConfigError


def term(combine: str, shapes: dict, weights: dict | None = None, **spec) -> Term:
    weights = weights or {m: 1.0 / len(shapes) for m in shapes}
    return Term(
        "feat", {"combine": combine, "distance": "mse", "adapter": "auto", **spec}, (4,), shapes, weights
    )


def test_per_teacher_sums_weighted_distances_with_own_adapters():
    t = term("per_teacher", {"a": (4,), "b": (6,)}, {"a": 0.25, "b": 0.75})
    assert set(t.adapters) == {"a", "b"}
    s = torch.randn(3, 4)
    ta, tb = torch.randn(3, 4), torch.randn(3, 6)
    expected = 0.25 * F.mse_loss(s, ta) + 0.75 * F.mse_loss(t.adapters["b"](s), tb)  # 'a' is identity
    torch.testing.assert_close(t(s, {"a": ta, "b": tb}), expected)


def test_concat_targets_the_concatenation_with_one_adapter():
    t = term("concat", {"a": (4,), "b": (6,)})
    s, ta, tb = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 6)
    expected = F.mse_loss(t.adapters["combined"](s), torch.cat([ta, tb], 1))
    assert t.adapters["combined"].proj.out_features == 10
    torch.testing.assert_close(t(s, {"a": ta, "b": tb}), expected)


def test_mean_targets_the_weighted_mean():
    t = term("mean", {"a": (4,), "b": (4,)}, {"a": 0.2, "b": 0.8})
    s, ta, tb = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(t(s, {"a": ta, "b": tb}), F.mse_loss(s, 0.2 * ta + 0.8 * tb))


@pytest.mark.parametrize("distance", ["mse", "l1", "smooth_l1", "cosine", "kl"])
def test_gate_weighs_each_samples_per_teacher_distance_by_a_learned_softmax_on_the_input(distance):
    torch.manual_seed(0)
    x = torch.randn(5, 1, 40)  # signals (C, L): pooled to 8 positions inside the gate
    t = Term(
        "feat", {"combine": "gate", "distance": distance, "adapter": "auto"}, (4,), {"a": (4,), "b": (6,)},
        {"a": 0.5, "b": 0.5}, {"input_shape": (1, 40)},
    )  # fmt: skip
    s = torch.randn(5, 4, requires_grad=True)
    ta, tb = torch.randn(5, 4), torch.randn(5, 6)
    loss = t(s, {"a": ta, "b": tb}, {"x": x})
    # by hand: the gate's softmax from the pooled input, one distance per sample and teacher
    pooled = torch.stack([x[:, :, 5 * j : 5 * j + 5].mean(2) for j in range(8)], 2).flatten(1)
    w = t.gate.mlp(pooled).softmax(1)
    expect = 0.0
    for i in range(5):
        for k, (m, tgt) in enumerate((("a", ta), ("b", tb))):
            one = t.losses[m](t.adapters[m](s[i : i + 1]), tgt[i : i + 1])  # the batch form on one sample
            expect = expect + w[i, k] * one
    torch.testing.assert_close(loss, expect / 5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in t.gate.parameters())
    assert s.grad is not None


@pytest.mark.parametrize("tap", [[], ["embed", ""]])
def test_a_list_of_taps_must_name_taps(tap):
    with pytest.raises(
        ConfigError, match="distill.terms.f.student_tap: a list of taps must name one or more"
    ):
        parse_distill({"terms": {"f": {"student_tap": tap}}}, no_teacher=False)


def test_a_list_of_taps_is_for_methods_that_read_several_maps():
    with pytest.raises(ConfigError, match="a list of taps is for methods that read several"):
        build_objective(
            {"terms": {"f": {"student_tap": ["a", "b"], "distance": "mse"}}},
            {"a": (4,), "b": (4,), "logits": (3,)}, {"t": {"a": (4,), "b": (4,)}}, {"t": 1.0},
        )  # fmt: skip


def test_gate_refuses_a_distance_without_per_sample_values_and_a_single_teacher():
    with pytest.raises(ConfigError, match="combine=gate .* no per-sample values"):
        Term(
            "feat",
            {"combine": "gate", "distance": "rkd"},
            (4,),
            {"a": (4,), "b": (4,)},
            {},
            {"input_shape": (4,)},
        )
    with pytest.raises(ConfigError, match="two or more teachers"):
        Term("feat", {"combine": "gate", "distance": "mse"}, (4,), {"a": (4,)}, {}, {"input_shape": (4,)})


def test_mean_with_different_shapes_says_what_to_use():
    with pytest.raises(ConfigError, match="combine=concat or combine=per_teacher"):
        term("mean", {"a": (4,), "b": (6,)})


def test_concat_maps_need_one_spatial_size():
    with pytest.raises(ConfigError, match="spatial"):
        Term("f", {"combine": "concat"}, (4, 2, 2), {"a": (4, 2, 2), "b": (4, 4, 4)}, {"a": 0.5, "b": 0.5})


def test_objective_total_is_weighted_sum_and_ce_can_be_zero():
    t = term("per_teacher", {"a": (4,)}, weight=2.5)
    obj = Objective(0.5, {"feat": t})
    logits, y = torch.randn(3, 5), torch.tensor([0, 1, 4])
    s = {"logits": logits, "embed": torch.randn(3, 4)}
    teachers = {"a": {"embed": torch.randn(3, 4)}}
    total, parts = obj(s, teachers, y)
    torch.testing.assert_close(parts["ce"], F.cross_entropy(logits, y))
    torch.testing.assert_close(total, 0.5 * parts["ce"] + 2.5 * parts["feat"])
    label_free = Objective(0.0, {"feat": t})
    total0, parts0 = label_free(s, teachers, y)
    assert "ce" not in parts0
    torch.testing.assert_close(total0, 2.5 * parts0["feat"])


@pytest.mark.parametrize("bad", ["heavy", None, True, float("nan"), -1.0])
def test_weights_must_be_numbers(bad):
    with pytest.raises(ConfigError, match="weight"):
        term("per_teacher", {"a": (4,)}, weight=bad)


def test_nothing_to_train_on_is_an_error():
    with pytest.raises(ConfigError, match="nothing to train"):
        Objective(0.0, {})


def test_terms_without_teachers_is_an_error():
    with pytest.raises(ConfigError, match="no teachers"):
        build_objective(
            {"terms": {"feat": {"student_tap": "embed"}}}, {"embed": (4,), "logits": (3,)}, None, None
        )


def test_null_term_is_switched_off_and_unknown_term_key_is_reported():
    assert parse_distill({"terms": {"a": None, "b": {"weight": 1}}}, no_teacher=False).terms == {
        "b": TermSpec(weight=1.0)
    }
    with pytest.raises(ConfigError, match="distill.terms.feat.*wieght"):
        term("per_teacher", {"a": (4,)}, wieght=3)


RHO_DISTILL = {
    "rho": 0.25,
    "label_loss": "mse",
    "terms": {
        "pi": {
            "weight": 2.0,
            "student_tap": "logits",
            "teacher_tap": "logits",
            "distance": "soft_mse",
            "adapter": "none",
        }
    },
}


def test_rho_mixes_least_squares_on_labels_and_on_teacher_probabilities():
    """Rahbar et al.: (1 − ρ)·‖f − onehot(y)‖² + ρ·w·‖f − softmax(t)‖², each a mean over elements."""
    obj = build_objective(RHO_DISTILL, {"logits": (3,)}, {"t": {"logits": (3,)}}, {"t": 1.0})
    assert obj.ce_weight == pytest.approx(0.75) and obj.terms["pi"].weight == pytest.approx(0.5)
    s, t, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    total, parts = obj({"logits": s.float()}, {"t": {"logits": t}}, y)
    onehot = torch.eye(3)[y]
    by_hand = 0.75 * ((s.float() - onehot) ** 2).mean() + 0.5 * ((s.float() - t.softmax(1)) ** 2).mean()
    torch.testing.assert_close(total, by_hand)
    assert set(parts) == {"label_mse", "pi"}


@pytest.mark.parametrize(("rho", "ce", "term"), [(0.0, 1.0, 0.0), (1.0, 0.0, 2.0)])
def test_rho_ends_are_labels_only_and_teacher_only(rho, ce, term):
    obj = build_objective({**RHO_DISTILL, "rho": rho}, {"logits": (3,)}, {"t": {"logits": (3,)}}, {"t": 1.0})
    assert obj.ce_weight == ce and obj.terms["pi"].weight == term


@pytest.mark.parametrize(
    ("key", "value", "named"), [("rho", 1.5, "distill.rho"), ("label_loss", "hinge", "label_loss")]
)
def test_bad_rho_or_label_loss_is_named(key, value, named):
    with pytest.raises(ConfigError, match=named):
        build_objective({**RHO_DISTILL, key: value}, {"logits": (3,)}, {"t": {"logits": (3,)}}, {"t": 1.0})


def test_teacher_logits_of_the_wrong_shape_are_refused_before_training():
    """A teacher outputting (B, 1) would broadcast into KL against (B, 10) without any error."""
    spec = {
        "student_tap": "logits",
        "teacher_tap": "logits",
        "distance": "kl",
        "adapter": "none",
        "combine": "mean",
    }
    with pytest.raises(ConfigError, match=r"reads the teachers' logits, but \{'t': \(1,\)\}.*10 classes"):
        Term("kd", spec, (10,), {"t": (1,)}, {"t": 1.0}, {"num_classes": 10})
    from kd_lightning.losses import create_loss

    with pytest.raises(
        ConfigError, match=r"kl compares student logits of shape \(8, 10\) with teacher .*\(8, 1\)"
    ):
        create_loss("kl")(torch.randn(8, 10), torch.randn(8, 1))
