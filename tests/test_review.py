"""AB and ReviewKD against their reference code's equations computed by hand (loops, float64), and the
pre-activation taps they read: every zoo model's `preact<k>` is its stage's output before the last ReLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.engine.prestage import run_pre_stages
from kd_lightning.errors import ConfigError
from kd_lightning.losses import create_loss
from kd_lightning.models import create_model
from kd_lightning.models.taps import FeatureTaps

from .conftest import built_module

G = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


# --- the pre-activation taps ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "shape", "post"),
    [
        ("resnet20", (3, 16, 16), "stage"),  # the residual sum before the stage's last ReLU
        ("ResNet50", (3, 16, 16), "stage"),
        ("vgg8", (3, 16, 16), "stage"),  # the block's output before its ReLU
        ("wrn_16_1", (3, 16, 16), "bn"),  # pre-activation blocks: the batch norm that reads the stage next
        ("cnn", (1, 8, 8), "stage"),
        ("cnn1d", (1, 40), "stage"),
    ],
)
def test_preact_taps_are_each_stage_before_its_last_relu(name, shape, post):
    model = create_model({"name": name}, 10, shape).eval()
    from kd_lightning.models.taps import stages

    k = len(stages(model))
    keys = [f"stage{i}" for i in range(1, k + 1)] + [f"preact{i}" for i in range(1, k + 1)]
    feats = FeatureTaps(model, keys)(rand(4, *shape))
    for i in range(1, k + 1):
        pre, out = feats[f"preact{i}"], feats[f"stage{i}"]
        assert (pre < 0).any(), f"preact{i} of {name} has no negative value: not before a ReLU"
        assert pre.shape == out.shape
        if post == "stage":
            assert torch.allclose(F.relu(pre), out)
    if name.startswith("wrn"):  # RepDistiller: block(k+1).layer[0].bn1(f_k), and the final bn1 for the last
        assert torch.allclose(feats["preact1"], model.block2.layer[0].bn1(feats["stage1"]))
        assert torch.allclose(feats["preact3"], model.bn1(feats["stage3"]))


def test_a_model_without_pre_activations_and_an_unknown_wildcard_are_clear_errors():
    from kd_lightning.core.stage_terms import expand_stage_terms

    mlp = create_model({"name": "mlp"}, 10, (1, 8, 8))
    with pytest.raises(ConfigError, match="declares no pre-activation features"):
        FeatureTaps(mlp, ["preact1"])
    with pytest.raises(ConfigError, match="has 2 stage"):  # cnn's two conv blocks (channels [32, 64])
        FeatureTaps(create_model({"name": "cnn"}, 10, (1, 8, 8)), ["preact3"])
    cnn = create_model({"name": "cnn"}, 10, (1, 8, 8))
    term = {"distance": "reviewkd", "student_tap": ["layer*", "map"], "teacher_tap": ["preact*", "map"]}
    with pytest.raises(ConfigError, match="unknown wildcard 'layer\\*'; valid: stage\\*, preact\\*"):
        expand_stage_terms({"terms": {"r": term}}, cnn, None)
    out = expand_stage_terms({"terms": {"r": {**term, "student_tap": ["stage*", "map"]}}}, cnn, None)
    assert out.terms["r"].student_tap == ["stage1", "stage2", "map"]
    assert out.terms["r"].teacher_tap == ["preact1", "preact2", "map"]


# --- AB ---------------------------------------------------------------------------------------------------
def boundary_by_hand(g: torch.Tensor, t: torch.Tensor, m: float) -> float:
    total = 0.0
    for a, b in zip(g.double().flatten().tolist(), t.double().flatten().tolist(), strict=True):
        if a > -m and b <= 0:
            total += (a + m) ** 2
        if a <= m and b > 0:
            total += (a - m) ** 2
    return total


def test_ab_is_repdistillers_margin_loss_with_stage_weights_and_a_connector_where_maps_differ():
    s_shapes = ((2, 4, 4), (3, 2, 2))
    t_shapes = ((2, 4, 4), (5, 2, 2))
    ab = create_loss("ab", {"student_shape": s_shapes, "teacher_shape": t_shapes}, margin=0.5)
    ab.eval()
    assert isinstance(ab.connectors[0], torch.nn.Identity)  # same channels and height: no connector
    assert not ab.connectors[1].relu  # RepDistiller's Connector: ConvReg(use_relu=False)
    b = 3
    s = [rand(b, *sh).requires_grad_() for sh in s_shapes]
    t = [rand(b, *sh) for sh in t_shapes]
    g1 = ab.connectors[1](s[1]).detach()
    assert (g1 < 0).any()
    # two stages: weights 2^(0-2+1) = 1/2 and 2^(1-2+1) = 1; ÷ batch, × 3/1000
    expect = (0.5 * boundary_by_hand(s[0], t[0], 0.5) + boundary_by_hand(g1, t[1], 0.5)) / b * 3 / 1000
    loss = ab(s, t)
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    loss.backward()
    # the gradient on the identity stage, by hand: 2(g ± m) where the indicator holds, × 1/2 ÷ b × 3/1000
    g, tt = s[0].detach().double(), t[0].double()
    by_hand = 2 * (g + 0.5) * ((g > -0.5) & (tt <= 0)) + 2 * (g - 0.5) * ((g <= 0.5) & (tt > 0))
    assert torch.allclose(s[0].grad.double(), by_hand * 0.5 / b * 3 / 1000, atol=1e-7)
    # what the teacher gives is the side of zero each neuron is on: any positive rescaling of it is the same
    assert ab(s, [2.5 * x for x in t]).item() == pytest.approx(loss.item(), rel=1e-6)
    stage = ab.pre_stage()
    assert stage.only and stage.student and stage.module is ab.connectors and stage.epochs == 30
    assert not any(p.requires_grad for p in ab.connectors.parameters())  # frozen outside its pre-stage
    with pytest.raises(ConfigError, match="list of feature maps"):
        create_loss("ab", {"student_shape": (3, 4, 4), "teacher_shape": (3, 4, 4)})


def test_ab_trains_its_connector_and_the_students_layers_first_then_ce_alone(make_cfg):
    cfg = make_cfg("distill=ab", "student=cnn", "student.channels=[8,16]", "distill.terms.ab.init_epochs=1")
    module, dm = built_module(cfg, "digits")
    term = module.objective.terms["ab"]
    # cnn declares its two conv blocks as stages: one connector stage each
    assert term.student_tap == ["preact1", "preact2"] and term.teacher_tap == ["preact1", "preact2"]
    assert term.pre_stage_only
    losses = dict(term.losses)
    assert len(losses) == 2  # one connector per teacher
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    conn = {k: v.clone() for k, v in module.objective.state_dict().items()}
    out = run_pre_stages(module, dm, "cpu")
    assert out["pre_stage_terms"] == ["ab"]
    after = module.student.state_dict()
    assert not torch.equal(before["features.0.weight"], after["features.0.weight"])
    assert torch.equal(before["fc.weight"], after["fc.weight"])  # the classifier stays out
    moved = [k for k, v in module.objective.state_dict().items() if not torch.equal(v, conn[k])]
    assert any(".connectors.0.conv." in k for k in moved)
    assert not module.needs_teachers


# --- ReviewKD ---------------------------------------------------------------------------------------------
def block_mean(x: torch.Tensor, side: int) -> torch.Tensor:
    """(C, H, W) → (C, side, side) by means over equal blocks, in loops."""
    c, h, _ = x.shape
    k = h // side
    out = torch.zeros(c, side, side, dtype=torch.float64)
    for ch in range(c):
        for i in range(side):
            for j in range(side):
                out[ch, i, j] = x[ch, i * k : (i + 1) * k, j * k : (j + 1) * k].double().mean()
    return out


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    d = [
        (x - y) ** 2
        for x, y in zip(a.double().flatten().tolist(), b.double().flatten().tolist(), strict=True)
    ]
    return sum(d) / len(d)


def test_hcl_is_mse_plus_the_pyramid_of_pooled_mses_weighted_by_halves():
    from kd_lightning.losses.review import hcl

    fs = [rand(2, 3, 4, 4), rand(2, 3, 2, 2), rand(2, 3, 1, 1)]
    ft = [rand(2, 3, 4, 4), rand(2, 3, 2, 2), rand(2, 3, 1, 1)]

    def pooled_mse(a, b, side):
        return mse(
            torch.stack([block_mean(x, side) for x in a]), torch.stack([block_mean(x, side) for x in b])
        )

    # 4×4: levels 2 (weight 1/2) and 1 (1/4), the 4 itself skipped; total weight 1.75
    l4 = (mse(fs[0], ft[0]) + pooled_mse(fs[0], ft[0], 2) / 2 + pooled_mse(fs[0], ft[0], 1) / 4) / 1.75
    l2 = (mse(fs[1], ft[1]) + pooled_mse(fs[1], ft[1], 1) / 2) / 1.5  # 2×2: level 1 only
    l1 = mse(fs[2], ft[2])  # one position: the MSE alone
    assert hcl(fs, ft).item() == pytest.approx(l4 + l2 + l1, rel=1e-5)


def test_reviewkd_fuses_from_the_deepest_level_with_attention_and_ramps_in():
    s_shapes = ((2, 4, 4), (3, 2, 2), (3, 2, 2))  # stage1, stage2 and the last map (pooled)
    t_shapes = ((4, 4, 4), (5, 2, 2), (6, 2, 2))
    r = create_loss("reviewkd", {"student_shape": s_shapes, "teacher_shape": t_shapes}).eval()
    assert [a.att_conv is not None for a in r.abfs] == [True, True, False]  # the deepest level fuses nothing
    assert [a.conv1[0].out_channels for a in r.abfs] == [3, 3, 3]  # mid = min(512, the pooled level's)
    assert [a.conv2[0].out_channels for a in r.abfs] == [4, 5, 6]  # to the teacher's channels
    s = [rand(2, *sh).requires_grad_() for sh in s_shapes]
    fused = r.fuse(s)
    assert [tuple(f.shape[1:]) for f in fused] == [(4, 4, 4), (5, 2, 2), (6, 1, 1)]
    # deeper levels do not see shallower ones; the shallowest sees all
    (g,) = torch.autograd.grad(fused[1].sum(), s[0], allow_unused=True)
    assert g is None or g.abs().sum() == 0
    grads = torch.autograd.grad(fused[0].sum(), s)
    assert all(x.abs().sum() > 0 for x in grads)
    # the fusion with constant attention (zero weights, biases b): σ(b0)·conv1(x) + σ(b1)·nearest(residual)
    abf = r.abfs[0]
    with torch.no_grad():
        abf.att_conv[0].weight.zero_()
        abf.att_conv[0].bias.copy_(torch.tensor([0.3, -1.2]))
    x, residual = rand(2, 2, 4, 4), rand(2, 3, 2, 2)
    _, mixed = abf(x, residual, (4, 4))
    up = residual.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest, 2×2 → 4×4
    by_hand = torch.sigmoid(torch.tensor(0.3)) * abf.conv1(x) + torch.sigmoid(torch.tensor(-1.2)) * up
    assert torch.allclose(mixed, by_hand, atol=1e-6)
    # the loss: HCL of the fused maps against the teacher's maps, its last map pooled; min(e / 20, 1)
    from kd_lightning.losses.review import hcl

    t = [rand(2, *sh) for sh in t_shapes]
    full = hcl(r.fuse(s), [t[0], t[1], t[2].mean((2, 3), keepdim=True)])
    assert r(s, t, epoch=19).item() == pytest.approx(full.item(), rel=1e-6)
    assert r(s, t, epoch=0).item() == pytest.approx(full.item() / 20, rel=1e-6)  # mdistiller's first epoch
    assert r(s, t, epoch=40).item() == pytest.approx(full.item(), rel=1e-6)


def test_reviewkd_on_1d_signals_and_a_resnet_pair_reads_the_stages_it_should(make_cfg):
    r = create_loss("reviewkd", {"student_shape": ((8, 5), (8, 5)), "teacher_shape": ((16, 5), (16, 5))})
    s, t = [rand(3, 8, 5).requires_grad_()] * 2, [rand(3, 16, 5)] * 2
    loss = r(s, t, epoch=30)
    loss.backward()
    assert torch.isfinite(loss) and s[0].grad.abs().sum() > 0
    # gradients reach the student's maps and every part of the fusion, nothing on the teacher's side
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in r.parameters())
    assert all(x.grad is None for x in t)
    cfg = make_cfg("distill=reviewkd", "student=cnn", "student.channels=[8,16]", "teachers.use=[cnn_s]")
    module, dm = built_module(cfg, "digits")
    term = module.objective.terms["reviewkd"]
    assert term.student_tap == ["stage1", "stage2", "map"] and term.teacher_tap == [
        "preact1",
        "preact2",
        "map",
    ]
    assert module.needs_teachers
