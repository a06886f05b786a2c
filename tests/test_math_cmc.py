"""Chapter 3's statements: the Lab function f is invertible, the two-view bound, core view vs full graph."""

import math

import sympy as sp
import torch
import torch.nn.functional as F

from contrastive import augment


def test_lab_f_pieces_join_with_equal_value_and_slope_and_invert_exactly():
    t, u = sp.Symbol("t", positive=True), sp.Symbol("u", positive=True)
    eps, kappa = sp.Rational(6, 29) ** 3, sp.Rational(29, 3) ** 3
    cube, linear = t ** sp.Rational(1, 3), (kappa * t + 16) / 116
    assert cube.subs(t, eps) == linear.subs(t, eps) == sp.Rational(6, 29)
    assert sp.simplify(sp.diff(cube, t).subs(t, eps) - sp.diff(linear, t)) == 0
    assert sp.simplify((u**3).subs(u, cube) - t) == 0
    assert sp.simplify(((116 * u - 16) / kappa).subs(u, linear) - t) == 0
    # The package converts with these exact constants.
    assert (augment._LAB_EPSILON, augment._LAB_KAPPA) == (float(eps), float(kappa))


def test_core_view_has_m_minus_one_terms_and_full_graph_m_choose_two():
    m = sp.Symbol("M", integer=True, positive=True)
    assert sp.simplify(sp.expand_func(sp.binomial(m, 2)) - m * (m - 1) / 2) == 0
    for views in range(2, 7):
        core = [(0, j) for j in range(1, views)]
        full = [(i, j) for i in range(views) for j in range(i + 1, views)]
        assert len(core) == views - 1 and len(full) == sp.binomial(views, 2)
    assert sp.binomial(2, 2) == 2 - 1  # two views: the objectives coincide


def log_ratio(x, y, r):
    xx, yy, xy = (x**2).sum(1)[:, None], (y**2).sum(1)[None, :], x @ y.T
    return -x.shape[1] / 2 * math.log(1 - r**2) - (xx - 2 * r * xy + yy) / (2 * (1 - r**2)) + (xx + yy) / 2


def pair_loss(x, y, r):
    s, targets = log_ratio(x, y, r), torch.arange(len(x))
    return F.cross_entropy(s, targets).item() + F.cross_entropy(s.T, targets).item()


def test_three_gaussian_views_respect_pairwise_core_and_full_graph_bounds():
    rhos, d = (0.9, 0.6, 0.3), 4
    pairs = [(0, 1), (0, 2), (1, 2)]
    true_mi = {(i, j): -d / 2 * math.log(1 - rhos[i] * rhos[j]) for i, j in pairs}
    gen = torch.Generator().manual_seed(1)
    for k in (2, 16, 256):
        losses = dict.fromkeys(pairs, 0.0)
        for _ in range(30):
            s = torch.randn(k, d, generator=gen, dtype=torch.float64)
            v = [
                math.sqrt(p) * s + math.sqrt(1 - p) * torch.randn(k, d, generator=gen, dtype=torch.float64)
                for p in rhos
            ]
            for i, j in pairs:
                losses[i, j] += pair_loss(v[i], v[j], math.sqrt(rhos[i] * rhos[j])) / 30
        for p in pairs:
            assert math.log(k) - losses[p] / 2 <= min(true_mi[p], math.log(k)) + 0.03, (k, p)
        core = losses[0, 1] + losses[0, 2]
        assert 2 * math.log(k) - core / 2 <= true_mi[0, 1] + true_mi[0, 2] + 0.05
        assert 3 * math.log(k) - sum(losses.values()) / 2 <= sum(true_mi.values()) + 0.05
    # At K = 256 the weakest pair's bound is close to its true value: the bound is not vacuous.
    assert math.log(256) - losses[1, 2] / 2 > 0.8 * true_mi[1, 2]


def test_the_optimal_gaussian_critic_is_a_dot_product_at_temperature_one_minus_r2_over_r():
    gen = torch.Generator().manual_seed(0)
    r, d, k = 0.8, 5, 7
    x = torch.randn(1, d, generator=gen, dtype=torch.float64)
    y = F.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1) * 2.0  # equal norms
    optimal = log_ratio(x, y, r).softmax(1)
    tau = (1 - r**2) / r
    assert torch.allclose(optimal, (x @ y.T / tau).softmax(1), atol=1e-12)
    assert not torch.allclose(optimal, (x @ y.T).softmax(1), atol=1e-3)
