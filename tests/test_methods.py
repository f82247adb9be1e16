"""The method zoo: each term against its paper's equation computed by hand (loops over samples, pairs
and channels, in float64, not the vectorised code), the invariances it must have, and gradients that
reach only the student and the trainable parts of the objective."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.core.objective import build_objective
from kd_lightning.errors import ConfigError
from kd_lightning.losses import create_loss

torch.set_default_dtype(torch.float32)
G = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


# --- DIST and logit standardization ----------------------------------------------------------------------
def pearson_by_hand(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_the_paper(beta, gamma, tau):
    zs, zt = rand(5, 7), rand(5, 7) * 3
    ys = [F.softmax(zs[i].double() / tau, 0).tolist() for i in range(5)]
    yt = [F.softmax(zt[i].double() / tau, 0).tolist() for i in range(5)]
    inter = 1 - sum(pearson_by_hand(ys[i], yt[i]) for i in range(5)) / 5
    cols = lambda y, c: [row[c] for row in y]  # noqa: E731
    intra = 1 - sum(pearson_by_hand(cols(ys, c), cols(yt, c)) for c in range(7)) / 7
    dist = create_loss("dist", beta=beta, gamma=gamma, temperature=tau)
    assert dist(zs, zt).item() == pytest.approx(tau * tau * (beta * inter + gamma * intra), rel=1e-4)
    # identical predictions: no loss
    assert dist(zt, zt).item() == pytest.approx(0.0, abs=1e-4)


def test_logit_standardization_is_kd_on_z_scores_and_ignores_each_sample_s_shift_and_scale():
    zs, zt, y = rand(4, 6), rand(4, 6), torch.tensor([0, 3, 5, 1])
    T = 2.0

    def z_score(row: torch.Tensor) -> torch.Tensor:
        row = row.double()
        mean = sum(row.tolist()) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row.tolist()) / (len(row) - 1))  # Bessel, as the authors
        return (row - mean) / (std + 1e-7)

    expect = 0.0
    for i in range(4):
        ps, pt = F.softmax(z_score(zs[i]) / T, 0), F.softmax(z_score(zt[i]) / T, 0)
        expect += float(sum(pt[k] * math.log(pt[k] / ps[k]) for k in range(6))) / 4
    kd_ls = create_loss("kl", temperature=T, standardize=True)
    assert kd_ls(zs, zt).item() == pytest.approx(expect * T * T, rel=1e-4)
    shifted = zs * torch.tensor([[2.0], [0.5], [3.0], [1.0]]) + torch.tensor([[1.0], [-4.0], [0.0], [7.0]])
    assert kd_ls(shifted, zt).item() == pytest.approx(kd_ls(zs, zt).item(), rel=1e-4)
    assert create_loss("kl", temperature=T)(shifted, zt).item() != pytest.approx(
        kd_ls(zs, zt).item(), rel=1e-2
    )
    dkd_ls = create_loss("dkd", temperature=T, warmup=0, standardize=True)
    plain = create_loss("dkd", temperature=T, warmup=0)
    zss, zts = torch.stack([z_score(r) for r in zs]).float(), torch.stack([z_score(r) for r in zt]).float()
    assert dkd_ls(zs, zt, y).item() == pytest.approx(plain(zss, zts, y).item(), rel=1e-4)


def test_camkd_weights_teachers_by_their_confidence_on_the_label_as_the_authors_code():
    K, C, B, T = 3, 5, 4, 4.0
    zs, zts, y = rand(B, C), [rand(B, C) * 2 for _ in range(K)], torch.tensor([0, 4, 2, 2])
    expect = 0.0
    for i in range(B):
        ce = [-math.log(F.softmax(zts[k][i].double(), 0)[int(y[i])].item()) for k in range(K)]
        soft = [math.exp(c) / sum(math.exp(c2) for c2 in ce) for c in ce]
        for k in range(K):
            w = (1 - soft[k]) / (K - 1)
            ps, pt = F.softmax(zs[i].double() / T, 0), F.softmax(zts[k][i].double() / T, 0)
            kl = float(sum(pt[c] * math.log(pt[c] / ps[c]) for c in range(C))) * T * T
            expect += w * kl
    expect /= B * K
    camkd = create_loss("camkd", {"teacher_shape": (K * C,), "num_classes": C}, temperature=T)
    assert camkd(zs, torch.cat(zts, 1), y).item() == pytest.approx(expect, rel=1e-4)
    # the teacher that is right about the label weighs more: a student that copies teacher A loses
    # little when A is the one that is right, and much more when B is
    a, b = torch.full((1, C), -3.0), torch.full((1, C), -3.0)
    a[0, 1], b[0, 2] = 3.0, 3.0
    two = create_loss("camkd", {"teacher_shape": (2 * C,), "num_classes": C}, temperature=T)
    a_right = two(a.clone(), torch.cat([a, b], 1), torch.tensor([1]))
    b_right = two(a.clone(), torch.cat([a, b], 1), torch.tensor([2]))
    assert a_right.item() < 0.1 * b_right.item()
    with pytest.raises(ConfigError, match="two or more teachers"):
        create_loss("camkd", {"teacher_shape": (C,), "num_classes": C})


def _min_norm_on_capped_simplex(g: torch.Tensor, cap: float, steps: int = 200) -> tuple[list[float], float]:
    """Brute force: the grid point of the simplex (every weight ≤ cap) with the smallest ‖Σ α_k g_k‖²."""
    best, best_val = None, math.inf
    for i in range(steps + 1):
        for j in range(steps + 1 - i):
            a = [i / steps, j / steps, (steps - i - j) / steps]
            if max(a) > cap + 1e-12:
                continue
            v = float(sum(a[k] * g[k].double() for k in range(3)).pow(2).sum())
            if v < best_val:
                best, best_val = a, v
    return best, best_val


def test_aekd_weights_are_the_min_norm_point_of_the_capped_simplex_and_the_loss_is_their_kl_sum():
    from kd_lightning.losses.logits import aekd_weights

    K, C, B, T = 3, 5, 4, 4.0
    zs, zts = rand(B, C).requires_grad_(), [rand(B, C) * 2 for _ in range(K)]
    aekd = create_loss("aekd", {"teacher_shape": (K * C,), "num_classes": C}, temperature=T, tolerance=0.6)
    loss = aekd(zs, torch.cat(zts, 1))
    # by hand: each teacher's KL (the authors' DistillKL: sum over classes and samples, × T² / B) and its
    # gradient on the student's logits from autograd, averaged over the batch
    kls, grads = [], []
    for k in range(K):
        kl = sum(
            float(sum(pt * math.log(pt / ps) for ps, pt in zip(F.softmax(zs[i].double() / T, 0), F.softmax(zts[k][i].double() / T, 0))))
            for i in range(B)
        ) * T * T / B  # fmt: skip
        kls.append(kl)
        kl_t = F.kl_div(F.log_softmax(zs / T, 1), F.softmax(zts[k] / T, 1), reduction="sum") * T * T / B
        grads.append(torch.autograd.grad(kl_t, zs)[0].mean(0))
    g = torch.stack(grads)
    alpha = aekd.last_weights
    assert alpha.sum().item() == pytest.approx(1.0, abs=1e-5) and alpha.max().item() <= 0.6 + 1e-5
    assert loss.item() == pytest.approx(sum(a * kl for a, kl in zip(alpha.tolist(), kls)), rel=1e-4)
    torch.testing.assert_close(
        aekd_weights(g, 0.6), alpha, atol=1e-4, rtol=0
    )  # closed-form gradients = autograd's
    # the solver's α against a brute-force search on a grid of the capped simplex
    grid, grid_val = _min_norm_on_capped_simplex(g, 0.6)
    val = float((alpha.double() @ g.double()).pow(2).sum())
    assert val <= grid_val * (1 + 1e-3) + 1e-12
    assert max(abs(a - b) for a, b in zip(alpha.tolist(), grid)) < 0.02
    # two teachers pulling apart: the closed form clip((g2 − g1)·g2 / ‖g1 − g2‖², 1 − C, C)
    g2 = torch.tensor([[1.0, 0.0, -1.0], [-0.2, 0.5, 0.1]])
    a1 = float(((g2[1] - g2[0]) @ g2[1]) / (g2[0] - g2[1]).pow(2).sum())
    for cap in (0.6, 0.9):
        expect = min(max(a1, 1 - cap), cap)
        assert aekd_weights(g2, cap)[0].item() == pytest.approx(expect, abs=1e-4)
    with pytest.raises(ConfigError, match="two or more teachers"):
        create_loss("aekd", {"teacher_shape": (C,), "num_classes": C})


def test_srd_is_the_log_of_summed_fourth_powers_between_batch_normalised_projections():
    B, Ds, Dt = 6, 5, 7
    srd = create_loss("srd", {"student_shape": (Ds,), "teacher_shape": (Dt,)}).train()
    zs, zt = rand(B, Ds), rand(B, Dt)
    W, b = srd.embed.weight.double(), srd.embed.bias.double()

    def bn(col: list[float]) -> list[float]:  # batch statistics, biased variance, eps 1e-4, no affine
        m = sum(col) / len(col)
        v = sum((c - m) ** 2 for c in col) / len(col)
        return [(c - m) / math.sqrt(v + 1e-4) for c in col]

    proj = [[float(W[d] @ zs[i].double() + b[d]) for d in range(Dt)] for i in range(B)]
    fs = list(zip(*[bn([proj[i][d] for i in range(B)]) for d in range(Dt)]))
    ft = list(zip(*[bn([float(zt[i, d]) for i in range(B)]) for d in range(Dt)]))
    expect = math.log(sum(abs(fs[i][d] - ft[i][d]) ** 4 for i in range(B) for d in range(Dt)))
    assert srd(zs, zt).item() == pytest.approx(expect, rel=1e-4)
    # a feature map is averaged over its positions first
    maps = rand(B, Ds, 3, 3)
    assert srd(maps, zt).item() == pytest.approx(srd(maps.mean((2, 3)), zt).item(), rel=1e-5)
    # invariant to a shift and a positive scale of the teacher's features (the batch norm removes them)
    assert srd(zs, 3 * zt + 1).item() == pytest.approx(srd(zs, zt).item(), rel=1e-3)


def test_ickd_matches_the_channel_gram_of_the_authors_code_and_ignores_spatial_size():
    B, Cs, Ct = 3, 4, 6
    ickd = create_loss("ickd", {"student_shape": (Cs, 5, 5), "teacher_shape": (Ct, 3, 3)})
    s, t = rand(B, Cs, 5, 5), rand(B, Ct, 3, 3)
    es = ickd.embed(s).double().detach()
    expect = 0.0
    for b in range(B):
        fs, ft = es[b].reshape(Ct, -1), t[b].double().reshape(Ct, -1)
        for i in range(Ct):
            gs = [float((fs[i] * fs[j]).sum()) for j in range(Ct)]
            gt = [float((ft[i] * ft[j]).sum()) for j in range(Ct)]
            ns, nt = math.sqrt(sum(v * v for v in gs)), math.sqrt(sum(v * v for v in gt))
            expect += sum((a / ns - c / nt) ** 2 for a, c in zip(gs, gt, strict=True))
    expect /= Ct * B
    assert ickd(s, t).item() == pytest.approx(expect, rel=1e-4)
    # G sums over positions: the same maps at another resolution (each value repeated 2 x 2) give the same G
    big = t.repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(_ickd_gram(big), _ickd_gram(t), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="ickd needs feature maps"):
        create_loss("ickd", {"student_shape": (7,), "teacher_shape": (12,)})


def _ickd_gram(x):
    from kd_lightning.losses.maps import ICKD

    return ICKD.gram(x)


# --- DKD ------------------------------------------------------------------------------------------------
def dkd_by_hand(zs, zt, y, alpha, beta, T, ramp):
    tck, nck = [], []
    for i in range(len(y)):
        ps, pt = F.softmax(zs[i].double() / T, 0), F.softmax(zt[i].double() / T, 0)
        c = int(y[i])
        bs, bt = [ps[c], 1 - ps[c]], [pt[c], 1 - pt[c]]
        tck.append(sum(bt[k] * math.log(bt[k] / bs[k]) for k in range(2)))
        rest = [k for k in range(len(zs[i])) if k != c]
        qs = F.softmax(zs[i, rest].double() / T, 0)
        qt = F.softmax(zt[i, rest].double() / T, 0)
        nck.append(sum(qt[k] * math.log(qt[k] / qs[k]) for k in range(len(rest))))
    return ramp * (alpha * sum(tck) / len(y) + beta * sum(nck) / len(y)) * T * T


# epoch: Lightning's, from 0; mdistiller's first epoch is 1, so its ramp there is 1/warmup, not 0
@pytest.mark.parametrize(
    ("epoch", "warmup", "ramp"), [(0, 0, 1.0), (0, 20, 0.05), (4, 20, 0.25), (40, 20, 1.0)]
)
def test_dkd_matches_the_paper(epoch, warmup, ramp):
    zs, zt, y = rand(6, 5), rand(6, 5) * 3, torch.tensor([0, 1, 2, 3, 4, 0])
    loss = create_loss("dkd", alpha=0.7, beta=3.0, temperature=2.0, warmup=warmup)
    got = loss(zs, zt, y=y, epoch=epoch)
    assert got.item() == pytest.approx(float(dkd_by_hand(zs, zt, y, 0.7, 3.0, 2.0, ramp)), rel=1e-5)


def test_dkd_with_alpha_beta_one_equals_kd_decomposition_bound():
    # Zhao et al. eq. 1: KD = TCKD + (1 − p_t^T) · NCKD; with alpha=1, beta=1 DKD ≥ KD − 0 only when the
    # teacher is confident, so check the identity itself on the parts.
    zs, zt, y = rand(4, 6), rand(4, 6), torch.tensor([1, 2, 3, 0])
    T = 1.0
    kd = create_loss("kl", temperature=T)(zs, zt).item()
    tck = create_loss("dkd", alpha=1, beta=0, temperature=T, warmup=0)(zs, zt, y=y).item()
    per = []
    for i in range(4):
        pt = F.softmax(zt[i].double(), 0)
        nck_i = create_loss("dkd", alpha=0, beta=1, temperature=T, warmup=0)(
            zs[i : i + 1], zt[i : i + 1], y=y[i : i + 1]
        )
        per.append((1 - pt[int(y[i])]).item() * nck_i.item())
    assert kd == pytest.approx(tck + sum(per) / 4, rel=1e-4)


# --- SP ---------------------------------------------------------------------------------------------------
def sp_by_hand(s, t):
    b = len(s)
    qs, qt = s.flatten(1).double(), t.flatten(1).double()
    total = 0.0
    for i in range(b):
        gs = torch.stack([qs[i] @ qs[j] for j in range(b)])
        gt = torch.stack([qt[i] @ qt[j] for j in range(b)])
        total += ((unit(gt) - unit(gs)) ** 2).sum().item()
    return total / (b * b)


def test_sp_matches_the_paper_and_is_scale_invariant():
    s, t = rand(5, 7), rand(5, 3, 2, 2)
    sp = create_loss("sp")
    assert sp(s, t).item() == pytest.approx(sp_by_hand(s, t), rel=1e-5)
    assert sp(s * 13.0, t * 0.01).item() == pytest.approx(sp(s, t).item(), rel=1e-4)


# --- RKD --------------------------------------------------------------------------------------------------
def rkd_by_hand(s, t, wd, wa):
    s, t = s.flatten(1).double(), t.flatten(1).double()
    b = len(s)
    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
    mu_s = sum((s[i] - s[j]).norm() for i, j in pairs) / len(pairs)
    mu_t = sum((t[i] - t[j]).norm() for i, j in pairs) / len(pairs)
    ld = sum(
        huber(((s[i] - s[j]).norm() / mu_s).item(), ((t[i] - t[j]).norm() / mu_t).item()) for i, j in pairs
    )
    trip = [(i, j, k) for i, j, k in itertools.product(range(b), repeat=3) if len({i, j, k}) == 3]
    la = sum(
        huber(
            (unit(s[i] - s[j]) @ unit(s[k] - s[j])).item(),
            (unit(t[i] - t[j]) @ unit(t[k] - t[j])).item(),
        )
        for i, j, k in trip
    )
    return wd * ld / len(pairs) + wa * la / len(trip)


def test_rkd_matches_the_paper_and_is_invariant_to_global_scale():
    s, t = rand(5, 4), rand(5, 9)
    rkd = create_loss("rkd", distance_weight=1.5, angle_weight=2.0)
    assert rkd(s, t).item() == pytest.approx(rkd_by_hand(s, t, 1.5, 2.0), rel=1e-4)
    assert rkd(s * 7.0, t * 0.2).item() == pytest.approx(rkd(s, t).item(), rel=1e-4)
    assert rkd(s + 3.0, t - 1.0).item() == pytest.approx(rkd(s, t).item(), rel=1e-3)  # and to translation


# --- PKT --------------------------------------------------------------------------------------------------
def pkt_by_hand(s, t):
    def cond(x):
        x = x.flatten(1).double()
        b = len(x)
        k = [[((unit(x[i]) @ unit(x[j])).item() + 1) / 2 for j in range(b)] for i in range(b)]
        return [[k[i][j] / sum(k[m][j] for m in range(b) if m != j) for j in range(b)] for i in range(b)]

    ps, pt = cond(s), cond(t)
    b = len(s)
    return sum(pt[i][j] * math.log(pt[i][j] / ps[i][j]) for i in range(b) for j in range(b) if i != j) / b


def pkt_as_repdistiller(s, t, eps=1e-7):
    """RepDistiller's cosine_similarity_loss, one entry at a time: rows sum to 1, diagonal kept, mean of b²."""

    def rows(x):
        x = x.double()
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        b = len(x)
        k = [[(float(x[i] @ x[j]) + 1) / 2 for j in range(b)] for i in range(b)]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = rows(s), rows(t)
    b = len(ps)
    return (
        sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b))
        / b**2
    )


def test_pkt_default_computes_what_repdistiller_computes():
    s, t = rand(6, 4), rand(6, 10)
    assert create_loss("pkt")(s, t).item() == pytest.approx(pkt_as_repdistiller(s, t), rel=1e-4)
    paper = create_loss("pkt", mode="paper")(s, t).item()
    assert paper == pytest.approx(pkt_by_hand(s, t), rel=1e-4)  # the other form, a different scale


def test_pkt_matches_the_paper_and_ignores_feature_norms():
    s, t = rand(6, 4), rand(6, 10)
    pkt = create_loss("pkt", mode="paper")
    assert pkt(s, t).item() == pytest.approx(pkt_by_hand(s, t), rel=1e-4)
    scale = torch.rand(6, 1, generator=G) + 0.5
    assert pkt(s * scale, t).item() == pytest.approx(pkt(s, t).item(), rel=1e-4)
    assert pkt(t[:, :4], t[:, :4]).item() == pytest.approx(0.0, abs=1e-6)


# --- CC ---------------------------------------------------------------------------------------------------
def cc_by_hand(s, t, gamma):
    """The exact Gaussian kernel on L2-normalised features (the Taylor series' limit)."""

    def corr(x):
        x = F.normalize(x.flatten(1).double(), dim=1)
        b = len(x)
        return torch.tensor(
            [[math.exp(-gamma * (x[i] - x[j]).pow(2).sum().item()) for j in range(b)] for i in range(b)]
        )

    b = len(s)
    return ((corr(t) - corr(s)) ** 2).sum().item() / (b * b)


def _cc(s, t, **kw):
    return create_loss("cc", {"student_shape": tuple(s.shape[1:]), "teacher_shape": tuple(t.shape[1:])}, **kw)


def test_cc_taylor_series_converges_to_the_gaussian_kernel_and_order_two_is_the_formula():
    s, t = rand(5, 6), rand(5, 3)
    assert _cc(s, t, mode="paper", gamma=0.4, order=20)(s, t).item() == pytest.approx(
        cc_by_hand(s, t, 0.4), rel=1e-5
    )

    # order 2 by hand: e^{-2γ} (1 + 2γ c + (2γ c)²/2), c the cosine
    def corr2(x):
        x = F.normalize(x.double(), dim=1)
        c = x @ x.T
        return math.exp(-0.8) * (1 + 0.8 * c + 0.32 * c * c)

    expect = ((corr2(t) - corr2(s)) ** 2).sum().item() / 25
    assert _cc(s, t, mode="paper", gamma=0.4, order=2)(s, t).item() == pytest.approx(expect, rel=1e-5)
    paper = _cc(s, t, mode="paper")
    assert paper(s * 4, t / 3).item() == pytest.approx(paper(s, t).item(), rel=1e-5)


def test_cc_default_computes_what_repdistiller_computes():
    """RepDistiller's Correlation on LinearEmbed(feat_dim) of each side: Δ = |e_S − e_T|,
    mean over i of Σ_d Δ_i,d Δ_i+1,d, written out here with explicit loops."""
    s, t = rand(5, 6), rand(5, 3)
    cc = _cc(s, t)
    assert cc.embed_s.out_features == cc.embed_t.out_features == 128
    with torch.no_grad():
        es = (s @ cc.embed_s.weight.T + cc.embed_s.bias).double()
        et = (t @ cc.embed_t.weight.T + cc.embed_t.bias).double()
    rows = [
        sum(abs(es[i, d] - et[i, d]) * abs(es[i + 1, d] - et[i + 1, d]) for d in range(128)) for i in range(4)
    ]
    assert cc(s, t).item() == pytest.approx(float(sum(rows) / 4), rel=1e-5)
    with pytest.raises(ConfigError, match="cc gamma belongs to mode=paper; mode=code takes feat_dim"):
        _cc(s, t, gamma=0.4)
    with pytest.raises(ConfigError, match="cc feat_dim belongs to mode=code"):
        _cc(s, t, mode="paper", feat_dim=64)


# --- AT ---------------------------------------------------------------------------------------------------
def at_by_hand(s, t, mode):
    b = len(s)
    vals = []
    for i in range(b):
        qs = unit((s[i].double() ** 2).sum(0).flatten())
        qt = unit((t[i].double() ** 2).sum(0).flatten())
        vals.append(((qs - qt) ** 2).mean().item() if mode == "code" else (qs - qt).norm().item())
    return sum(vals) / b


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_matches_the_paper_and_ignores_channels_and_scale(mode):
    s, t = rand(3, 4, 5, 5), rand(3, 9, 5, 5)
    at = create_loss("at", mode=mode)
    assert at(s, t).item() == pytest.approx(at_by_hand(s, t, mode), rel=1e-5)
    assert at(s * 5, t).item() == pytest.approx(at(s, t).item(), rel=1e-4)
    if mode == "code":  # RepDistiller: whichever map is larger is average-pooled to the other's size
        small = rand(3, 4, 2, 2)
        pooled = F.adaptive_avg_pool2d(t, (2, 2))
        assert at(small, t).item() == pytest.approx(at_by_hand(small, pooled, mode), rel=1e-5)
        assert at(t, small).item() == pytest.approx(at_by_hand(pooled, small, mode), rel=1e-5)
    else:  # the student map is resized to the teacher's
        small = rand(3, 4, 3, 3)
        resized = F.interpolate(small, size=(5, 5), mode="bilinear", align_corners=False)
        assert at(small, t).item() == pytest.approx(at_by_hand(resized, t, mode), rel=1e-5)


def test_at_on_vectors_is_a_clear_error():
    from kd_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="feature maps"):
        create_loss("at")(rand(3, 4), rand(3, 4))


# --- NST --------------------------------------------------------------------------------------------------
def nst_by_hand(s, t):
    vals = []
    for n in range(len(s)):
        fs = [unit(s[n, c].double().flatten()) for c in range(s.shape[1])]
        ft = [unit(t[n, c].double().flatten()) for c in range(t.shape[1])]
        k = lambda a, b: (a @ b).item() ** 2  # noqa: E731
        tt = sum(k(a, b) for a in ft for b in ft) / len(ft) ** 2
        ss = sum(k(a, b) for a in fs for b in fs) / len(fs) ** 2
        st = sum(k(a, b) for a in fs for b in ft) / (len(fs) * len(ft))
        vals.append(tt + ss - 2 * st)
    return sum(vals) / len(vals)


def test_nst_matches_the_paper_and_ignores_channel_scale():
    s, t = rand(2, 3, 4, 4), rand(2, 5, 4, 4)
    nst = create_loss("nst")
    assert nst(s, t).item() == pytest.approx(nst_by_hand(s, t), rel=1e-5)
    per_channel = torch.rand(1, 3, 1, 1, generator=G) + 0.1
    assert nst(s * per_channel, t).item() == pytest.approx(nst(s, t).item(), rel=1e-4)
    assert nst(t, t).item() == pytest.approx(0.0, abs=1e-6)
    big = rand(2, 5, 8, 8)  # RepDistiller: the larger map average-pooled to the smaller's size
    pooled = F.adaptive_avg_pool2d(big, (4, 4))
    assert nst(s, big).item() == pytest.approx(nst_by_hand(s, pooled), rel=1e-5)


# --- VID --------------------------------------------------------------------------------------------------
def test_vid_is_the_gaussian_negative_log_likelihood():
    mu, t = rand(4, 3, 2, 2), rand(4, 3, 2, 2)
    vid = create_loss("vid", {"teacher_shape": (3, 2, 2)}, init_var=2.0)
    with torch.no_grad():
        vid.alpha.copy_(torch.tensor([0.1, -0.5, 2.0]))
    total, n = 0.0, 0
    for i, c, h, w in itertools.product(range(4), range(3), range(2), range(2)):
        var = math.log1p(math.exp(vid.alpha[c].item())) + 1e-5
        total += 0.5 * ((t[i, c, h, w].item() - mu[i, c, h, w].item()) ** 2 / var + math.log(var))
        n += 1
    assert vid(mu, t).item() == pytest.approx(total / n, rel=1e-5)
    fresh = create_loss("vid", {"teacher_shape": (3,)}, init_var=2.0)
    assert fresh.variance().detach().numpy() == pytest.approx([2.0] * 3, rel=1e-5)


# --- CRD --------------------------------------------------------------------------------------------------
def test_crd_is_nce_against_the_memory_banks_and_updates_them():
    n, d, k, tau = 10, 4, 3, 0.5
    crd = create_loss(
        "crd",
        {"student_shape": (6,), "teacher_shape": (5,), "num_samples": n},
        feat_dim=d,
        nce_k=k,
        nce_t=tau,
    )
    s, t, index = rand(2, 6), rand(2, 5), torch.tensor([7, 2])
    negatives = torch.tensor([[1, 2, 9], [0, 7, 4]])
    crd.draw_negatives = lambda idx: negatives
    mem_s, mem_t = crd.memory_s.clone().double(), crd.memory_t.clone().double()
    vs = [unit(crd.embed_s.weight.double() @ s[i].double() + crd.embed_s.bias.double()) for i in range(2)]
    vt = [unit(crd.embed_t.weight.double() @ t[i].double() + crd.embed_t.bias.double()) for i in range(2)]

    def direction(anchors, bank):
        h = [
            [math.exp((bank[j] @ anchors[i]).item() / tau) for j in [int(index[i]), *negatives[i].tolist()]]
            for i in range(2)
        ]
        z = sum(map(sum, h)) / (2 * (k + 1)) * n
        noise = k / n
        loss = 0.0
        for row in h:
            row = [v / z for v in row]
            loss -= math.log(row[0] / (row[0] + noise)) + sum(math.log(noise / (v + noise)) for v in row[1:])
        return loss / 2

    expect = direction(vs, mem_t) + direction(vt, mem_s)
    crd.train()
    assert crd(s, t, index=index).item() == pytest.approx(expect, rel=1e-4)
    for i in range(2):
        j = int(index[i])
        assert crd.memory_s[j].double().numpy() == pytest.approx(
            unit(0.5 * mem_s[j] + 0.5 * vs[i]).detach().numpy(), abs=1e-5
        )
        assert crd.memory_t[j].double().numpy() == pytest.approx(
            unit(0.5 * mem_t[j] + 0.5 * vt[i]).detach().numpy(), abs=1e-5
        )


# --- gradients reach only the student side ----------------------------------------------------------------
METHOD_SHAPES = {
    # method: (term options, student feature shape, teacher feature shape)
    "kd": ({"distance": "kl", "student_tap": "logits", "teacher_tap": "logits"}, (10,), (10,)),
    "dkd": ({"distance": "dkd", "student_tap": "logits", "teacher_tap": "logits", "warmup": 0}, (10,), (10,)),
    "dist": ({"distance": "dist", "student_tap": "logits", "teacher_tap": "logits"}, (10,), (10,)),
    "camkd": (
        {"distance": "camkd", "student_tap": "logits", "teacher_tap": "logits", "adapter": "none"},
        (10,),
        (10,),
    ),
    "aekd": (
        {"distance": "aekd", "student_tap": "logits", "teacher_tap": "logits", "adapter": "none"},
        (10,),
        (10,),
    ),
    "kd_ls": (
        {"distance": "kl", "student_tap": "logits", "teacher_tap": "logits", "standardize": True},
        (10,),
        (10,),
    ),
    "fitnet": (
        {"distance": "mse", "adapter": "auto", "student_tap": "map", "teacher_tap": "map"},
        (4, 6, 6),
        (8, 3, 3),
    ),
    "at": ({"distance": "at", "student_tap": "map", "teacher_tap": "map"}, (4, 6, 6), (8, 3, 3)),
    "nst": ({"distance": "nst", "student_tap": "map", "teacher_tap": "map"}, (4, 3, 3), (8, 3, 3)),
    "ickd": ({"distance": "ickd", "student_tap": "map", "teacher_tap": "map"}, (4, 6, 6), (8, 3, 3)),
    "srd": ({"distance": "srd"}, (7,), (12,)),
    "ft": ({"distance": "ft", "student_tap": "map", "teacher_tap": "map"}, (4, 6, 6), (8, 3, 3)),
    "sp": ({"distance": "sp"}, (7,), (12,)),
    "rkd": ({"distance": "rkd"}, (7,), (12,)),
    "pkt": ({"distance": "pkt"}, (7,), (12,)),
    "cc": ({"distance": "cc"}, (7,), (12,)),
    "crd": ({"distance": "crd", "nce_k": 5}, (7,), (12,)),
    "vid": ({"distance": "vid", "adapter": "mlp"}, (7,), (12,)),
}


@pytest.mark.parametrize("method", sorted(METHOD_SHAPES))
@pytest.mark.parametrize("combine", ["per_teacher", "concat"])
def test_gradients_flow_to_student_and_objective_only(method, combine):
    opts, s_shape, t_shape = METHOD_SHAPES[method]
    if method in ("camkd", "aekd") and combine != "concat":  # it reads all teachers at once: concat only
        with pytest.raises(ConfigError, match="two or more teachers"):
            build_objective({"ce_weight": 1.0, "terms": {method: {**opts, "combine": combine}}}, {"logits": (10,)},
                            {"a": {"logits": t_shape}, "b": {"logits": t_shape}}, {"a": 0.5, "b": 0.5},
                            {"num_samples": 50, "num_classes": 10})  # fmt: skip
        return
    tap_s, tap_t = opts.get("student_tap", "embed"), opts.get("teacher_tap", "embed")
    spec = {"weight": 1.0, "combine": combine, **opts}
    teacher_shapes = {"a": {tap_t: t_shape}, "b": {tap_t: t_shape}}
    obj = build_objective({"ce_weight": 1.0, "terms": {method: spec}}, {tap_s: s_shape, "logits": (10,)},
                          teacher_shapes, {"a": 0.5, "b": 0.5}, {"num_samples": 50, "num_classes": 10})  # fmt: skip
    b = 6
    student = {tap_s: rand(b, *s_shape).requires_grad_(), "logits": rand(b, 10).requires_grad_()}
    teachers = {m: {tap_t: rand(b, *t_shape)} for m in ("a", "b")}
    y, index = torch.randint(0, 10, (b,), generator=G), torch.arange(b)
    loss, parts = obj(student, teachers, y, index=index, epoch=3)
    assert torch.isfinite(loss) and parts[method].item() != 0.0
    loss.backward()
    assert student[tap_s].grad is not None and student[tap_s].grad.abs().sum() > 0
    assert all(t[tap_t].grad is None and not t[tap_t].requires_grad for t in teachers.values())
    trainable = [p for p in obj.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable), [
        n for n, p in obj.named_parameters() if p.grad is None
    ]


# --- every config runs end to end on digits ----------------------------------------------------------------
MAP_METHODS = {"at", "nst", "ickd", "ft", "ab", "reviewkd"}
CONFIGS = [
    "kd",
    "fitnet",
    "at",
    "sp",
    "rkd",
    "pkt",
    "nst",
    "cc",
    "dkd",
    "crd",
    "vid",
    "dist",
    "kd_ls",
    "dkd_ls",
    "camkd",
    "aekd",
    "ickd",
    "ft",
    "srd",
    "ab",
    "reviewkd",
]


MULTI_ONLY = {"camkd", "aekd"}  # they weigh two or more teachers: with one, a clear error before training


@pytest.mark.parametrize("teachers", ["two", "one"])
@pytest.mark.parametrize("name", [*CONFIGS, "[kd,at]", "[crd,kd]"])
def test_each_method_config_trains_a_few_batches(make_cfg, name, teachers):
    from kd_lightning.runners.run import run

    maps = any(m in name for m in MAP_METHODS)
    cfg = make_cfg(
        f"distill={name}",
        *(["teachers.use=[cnn_s]"] if teachers == "one" else []),
        *(["student=cnn", "student.channels=[8,16]"] if maps else []),
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=4",
        "+trainer.limit_val_batches=1",
        "callbacks=none",
        *([f"distill.terms.{name}.init_epochs=1"] if name in ("ft", "ab") else []),
    )
    if teachers == "one" and name in MULTI_ONLY:
        with pytest.raises(ConfigError, match="two or more teachers"):
            run(cfg)
        return
    res = run(cfg)
    assert res["status"] == "ok" and 0 <= res["test_acc"] <= 1
    # FT's paraphraser, AB's connector and the student's layers trained first
    assert res.get("pre_stage_terms") == ([name] if name in ("ft", "ab") else None)
    if name.startswith("["):
        assert set(cfg.distill.terms) == set(name.strip("[]").split(","))  # the terms of both files, summed


def test_a_gated_feature_term_trains_with_two_teachers_and_its_gate_is_in_the_checkpoint(make_cfg):
    from kd_lightning.runners.run import run

    cfg = make_cfg("distill=landro2021", "distill.terms.feat.combine=gate", "trainer.max_epochs=1",
                   "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1")  # fmt: skip
    res = run(cfg)
    assert res["status"] == "ok"
    ckpt = torch.load(res["best_checkpoint"], map_location="cpu", weights_only=True)
    gate = [k for k in ckpt["state_dict"] if ".gate." in k]
    assert gate and all(k.startswith("objective.terms.feat.gate.") for k in gate)


def test_crd_whole_bank_and_gathered_scores_agree():
    crd = create_loss(
        "crd", {"student_shape": (6,), "teacher_shape": (5,), "num_samples": 40}, feat_dim=4, nce_k=7
    )
    crd.eval()  # no memory update between the two calls
    s, t, index = rand(3, 6), rand(3, 5), torch.tensor([1, 5, 30])
    negatives = torch.randint(0, 40, (3, 7), generator=G)
    crd.draw_negatives = lambda idx: negatives
    whole = crd(s, t, index=index)
    crd.full_bank_ratio = 0  # force the gather path
    assert crd(s, t, index=index).item() == pytest.approx(whole.item(), rel=1e-5)


def test_ickd_embeds_the_student_as_the_authors_code_value_and_gradient():
    """ICKD.py's Embed: a 1x1 convolution without bias, then BatchNorm2d in training mode (batch statistics,
    biased variance, eps 1e-5, affine weight and bias), then the row-normalised channel Gram matrices."""
    B, Cs, Ct = 4, 5, 6
    ickd = create_loss("ickd", {"student_shape": (Cs, 4, 4), "teacher_shape": (Ct, 2, 2)})
    conv, bn = ickd.embed
    with torch.no_grad():
        bn.weight.copy_(rand(Ct).abs() + 0.5)
        bn.bias.copy_(rand(Ct))
    s, t = rand(B, Cs, 4, 4).requires_grad_(True), rand(B, Ct, 2, 2)
    got = ickd.train()(s, t)
    (g_got,) = torch.autograd.grad(got, s)

    x = s.double()
    w, gamma, beta = conv.weight.double().view(Ct, Cs), bn.weight.double(), bn.bias.double()
    e = torch.einsum("oc,bchw->bohw", w, x)  # the 1x1 convolution
    mean = e.mean((0, 2, 3), keepdim=True)
    var = ((e - mean) ** 2).mean((0, 2, 3), keepdim=True)  # batch norm: the biased batch variance
    e = (e - mean) / torch.sqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    fs, ft = e.reshape(B, Ct, -1), t.double().reshape(B, Ct, -1)
    gs = F.normalize(fs @ fs.transpose(1, 2), dim=2)
    gt = F.normalize(ft @ ft.transpose(1, 2), dim=2)
    expect = ((gs - gt) ** 2).reshape(B, -1).sum() / (Ct * B)
    (g_expect,) = torch.autograd.grad(expect, s)
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    torch.testing.assert_close(g_got, g_expect, rtol=1e-4, atol=1e-7)
    # without the batch norm (the earlier port) the value and the gradient differ
    plain = F.normalize(
        (
            torch.einsum("oc,bchw->bohw", w, x).reshape(B, Ct, -1)
            @ torch.einsum("oc,bchw->bohw", w, x).reshape(B, Ct, -1).transpose(1, 2)
        ),
        dim=2,
    )
    assert ((plain - gt) ** 2).sum().item() / (Ct * B) != pytest.approx(got.item(), rel=1e-3)


def _composed_objective(make_cfg, *overrides, student, teacher):
    """The objective a run of these overrides builds for given tap shapes (no data, no models)."""
    from omegaconf import OmegaConf

    cfg = make_cfg(*overrides)
    distill = OmegaConf.to_container(cfg.distill, resolve=True)
    return build_objective(distill, student, {"t": teacher}, {"t": 1.0}, {"num_classes": 5})


@pytest.mark.parametrize("epoch", [0, 9, 30])
def test_dkd_ls_config_is_the_authors_command_value_and_gradient(make_cfg, epoch):
    """The logit-standardization authors' DKD+LS (README command; tools/train.py): DKD's alpha and beta × 9
    (alpha 9, beta 72), T = 2, on z-scored logits (std with Bessel's correction, + 1e-7), CE weight 1,
    min(e / 20, 1) with e counted from 1."""
    obj = _composed_objective(make_cfg, "distill=dkd_ls", student={"logits": (5,)}, teacher={"logits": (5,)})
    zs, zt, y = rand(6, 5).requires_grad_(True), rand(6, 5) * 4, torch.tensor([0, 1, 2, 3, 4, 1])
    got, _ = obj({"logits": zs}, {"t": {"logits": zt}}, y, epoch=epoch)
    (g_got,) = torch.autograd.grad(got, zs)

    def z(v):
        v = v.double()
        return (v - v.mean(1, keepdim=True)) / (v.std(1, keepdim=True) + 1e-7)

    T, alpha, beta = 2.0, 9.0, 72.0
    a, b = z(zs) / T, z(zt) / T
    target = F.one_hot(y, 5).bool()
    ps, pt = a.softmax(1), b.softmax(1)
    bs = torch.stack([ps[target], 1 - ps[target]], 1)
    bt = torch.stack([pt[target], 1 - pt[target]], 1)
    tckd = (bt * (bt.log() - bs.log())).sum() / len(y) * T * T
    qs, qt = (a - 1000.0 * target).log_softmax(1), (b - 1000.0 * target).softmax(1)
    nckd = (qt * (qt.clamp_min(1e-300).log() - qs)).sum() / len(y) * T * T
    expect = F.cross_entropy(zs.double(), y) + min((epoch + 1) / 20, 1.0) * (alpha * tckd + beta * nckd)
    (g_expect,) = torch.autograd.grad(expect, zs)
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    torch.testing.assert_close(g_got, g_expect.float(), rtol=1e-4, atol=1e-6)


def test_reviewkd_weighs_as_mdistiller_on_cifar100_and_on_imagenet(make_cfg, tmp_path):
    from omegaconf import OmegaConf

    from .conftest import FAST_TRAINER, compose_cfg

    cifar = OmegaConf.to_container(make_cfg("distill=reviewkd").distill, resolve=True)["terms"]["reviewkd"]
    assert (cifar["weight"], cifar["warmup"], cifar["student_tap"]) == (5.0, 20, ["stage*", "map"])
    cfg = compose_cfg(
        [*FAST_TRAINER, "experiment=imagenet/resnet34_resnet18", "distill=reviewkd", "data.root=/x"],
        tmp_path / "run", tmp_path / "cache",
    )  # fmt: skip
    imagenet = OmegaConf.to_container(cfg.distill, resolve=True)
    term = imagenet["terms"]["reviewkd"]
    assert (imagenet["ce_weight"], term["weight"], term["warmup"]) == (1.0, 1.0, 1)
    assert term["student_tap"] == ["preact*", "map"] and term["teacher_tap"] == ["preact*", "map"]
    dkd = OmegaConf.to_container(
        compose_cfg([*FAST_TRAINER, "experiment=imagenet/resnet34_resnet18", "distill=dkd", "data.root=/x"],
                    tmp_path / "run", tmp_path / "cache").distill, resolve=True)["terms"]["dkd"]  # fmt: skip
    assert (dkd["beta"], dkd["temperature"], dkd["warmup"]) == (0.5, 1.0, 1)  # mdistiller's r34_r18 DKD
    # the term: weight × min(e / warmup, 1) × HCL of the fused student maps against the teacher's
    from kd_lightning.losses.review import hcl

    shapes = {"student": ((2, 4, 4), (3, 2, 2), (3, 2, 2)), "teacher": ((4, 4, 4), (5, 2, 2), (6, 2, 2))}
    spec = {**cifar, "student_tap": ["stage1", "stage2", "map"], "teacher_tap": ["preact1", "preact2", "map"]}
    obj = build_objective(
        {"ce_weight": 0.0, "terms": {"reviewkd": spec}},
        {"stage1": shapes["student"][0], "stage2": shapes["student"][1], "map": shapes["student"][2]},
        {
            "t": {
                "preact1": shapes["teacher"][0],
                "preact2": shapes["teacher"][1],
                "map": shapes["teacher"][2],
            }
        },
        {"t": 1.0},
    )
    loss = obj.terms["reviewkd"].losses["t"].eval()
    s = [rand(2, *sh).requires_grad_(True) for sh in shapes["student"]]
    t = [rand(2, *sh) for sh in shapes["teacher"]]
    got, _ = obj({"logits": rand(2, 5), **dict(zip(("stage1", "stage2", "map"), s, strict=True))},
                 {"t": dict(zip(("preact1", "preact2", "map"), t, strict=True))}, torch.zeros(2, dtype=torch.long),
                 epoch=3)  # fmt: skip
    expect = 5.0 * (4 / 20) * hcl(loss.fuse(s), [t[0], t[1], t[2].mean((2, 3), keepdim=True)])
    assert got.item() == pytest.approx(expect.item(), rel=1e-6)
    g_got = torch.autograd.grad(got, s, retain_graph=True)
    g_expect = torch.autograd.grad(expect, s)
    for a, b in zip(g_got, g_expect, strict=True):
        torch.testing.assert_close(a, b)
