"""The Introduction's identities and the package functions it derives, re-checked outside the notebook.

Every check is paired with a named wrong alternative that the same assertion rejects.
"""

import math

import sympy as sp
import torch

from contrastive import losses
from contrastive.evaluate import knn_accuracy


def sq(v):
    return (v.T * v)[0]


def test_triplet_gradients_in_the_active_region():
    a, p, n = (sp.Matrix(sp.symbols(f"{name}1:4", real=True)) for name in "apn")
    alpha = sp.Symbol("alpha", nonnegative=True)
    loss = sq(a - p) - sq(a - n) + alpha
    grad = lambda v: sp.Matrix([sp.diff(loss, vi) for vi in v])  # noqa: E731
    assert sp.simplify(grad(a) - 2 * (n - p)) == sp.zeros(3, 1)
    assert sp.simplify(grad(p) - 2 * (p - a)) == sp.zeros(3, 1)
    assert sp.simplify(grad(n) - 2 * (a - n)) == sp.zeros(3, 1)
    # negative control, at a point: the anchor gradient is not 2(p - n) (the sign flipped)
    point = dict(zip([*a, *p, *n, alpha], [1, 0, 2, -1, 3, 0, 2, 2, -1, sp.Rational(1, 2)]))
    assert (grad(a) - 2 * (p - n)).subs(point) != sp.zeros(3, 1)
    assert (grad(p) - 2 * (a - p)).subs(point) != sp.zeros(3, 1)


def _triplets():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(64, 16, generator=gen, dtype=torch.float64) for _ in range(3)]


def test_package_triplet_loss_value_is_the_mean_of_hinges_written_out():
    a, p, n = _triplets()
    margin = 0.5
    value = losses.triplet_loss(a, p, n, margin).item()
    sq_dist = lambda u, v: sum((ui - vi) ** 2 for ui, vi in zip(u, v))  # noqa: E731
    rows = list(zip(a.tolist(), p.tolist(), n.tolist()))
    hinges = [max(0.0, sq_dist(x, y) - sq_dist(x, z) + margin) for x, y, z in rows]
    assert abs(value - sum(hinges) / len(rows)) < 1e-12
    assert 0 < sum(h > 0 for h in hinges) < len(rows)  # the inputs hold active and inactive triplets
    # negative controls: unsquared distances, a sum instead of a mean, no margin
    unsquared = [max(0.0, sq_dist(x, y) ** 0.5 - sq_dist(x, z) ** 0.5 + margin) for x, y, z in rows]
    no_margin = [max(0.0, sq_dist(x, y) - sq_dist(x, z)) for x, y, z in rows]
    assert abs(value - sum(unsquared) / len(rows)) > 1e-3
    assert abs(value - sum(hinges)) > 1e-3
    assert abs(value - sum(no_margin) / len(rows)) > 1e-3


def test_package_triplet_loss_gradient_is_the_closed_form_on_active_triplets_only():
    a, p, n = (t.requires_grad_(True) for t in _triplets())
    margin = 0.5
    losses.triplet_loss(a, p, n, margin).backward()
    with torch.no_grad():
        active = ((a - p).pow(2).sum(1) - (a - n).pow(2).sum(1) + margin > 0).double().unsqueeze(1)
        scale = active / len(a)
        assert torch.allclose(a.grad, scale * 2 * (n - p), atol=1e-12)
        assert torch.allclose(p.grad, scale * 2 * (p - a), atol=1e-12)
        assert torch.allclose(n.grad, scale * 2 * (a - n), atol=1e-12)
        # negative controls: no mask on inactive triplets; the sign of the anchor gradient flipped
        assert not torch.allclose(a.grad, 2 * (n - p) / len(a), atol=1e-6)
        assert not torch.allclose(a.grad, scale * 2 * (p - n), atol=1e-6)


def test_squared_distance_on_the_unit_sphere_is_two_minus_twice_the_cosine():
    def on_sphere(theta, phi):
        return sp.Matrix([sp.sin(theta) * sp.cos(phi), sp.sin(theta) * sp.sin(phi), sp.cos(theta)])

    t = sp.symbols("t1:5", real=True)
    u, v = on_sphere(t[0], t[1]), on_sphere(t[2], t[3])
    assert sp.simplify(sq(u - v) - (2 - 2 * (u.T * v)[0])) == 0
    # negative control: the factor 2 dropped, ||u - v||^2 = 1 - u.v, fails at a point of the sphere
    at = dict(zip(t, [sp.pi / 3, 0, sp.pi / 2, sp.pi / 4]))
    assert sp.N((sq(u - v) - (1 - (u.T * v)[0])).subs(at)) != 0


def test_log_sum_exp_tends_to_the_maximum_and_softmax_to_one_hot():
    tau, u = sp.symbols("tau u", positive=True)
    s_max = sp.Symbol("s_max", real=True)
    gaps = sp.symbols("g1:4", positive=True)
    lse = tau * sp.log(sp.exp(s_max / tau) + sum(sp.exp((s_max - g) / tau) for g in gaps))
    rest = tau * sp.log(1 + sum(sp.exp(-g / tau) for g in gaps))
    assert sp.simplify(sp.exp((lse - s_max) / tau) - sp.exp(rest / tau)) == 0
    # the squeeze with one exponential: 0 < rest <= tau log(1 + (K - 1) exp(-g_min / tau)) -> 0
    g_min = sp.Symbol("g_min", positive=True)
    squeeze = tau * sp.log(1 + len(gaps) * sp.exp(-g_min / tau))
    assert sp.limit(squeeze, tau, 0, "+") == 0
    at = {gaps[0]: sp.Rational(1, 10), gaps[1]: sp.Rational(1, 2), gaps[2]: 2}
    for t in (sp.Rational(1, 50), sp.Rational(1, 5), 1, 5):
        r = sp.N(rest.subs(at).subs(tau, t))
        assert 0 < r <= sp.N(squeeze.subs({g_min: sp.Rational(1, 10), tau: t}))
        # negative control: the squeeze with the largest gap in place of the smallest fails
        assert r > sp.N(squeeze.subs({g_min: 2, tau: t}))
    weight_max = 1 / (1 + sum(sp.exp(-g * u) for g in gaps))
    assert sp.limit(weight_max, u, sp.oo) == 1
    # negative control: the weight of a score below the maximum tends to 0, not 1
    assert sp.limit(sp.exp(-gaps[0] * u) * weight_max, u, sp.oo) == 0


def test_softplus_with_temperature_tends_to_the_hinge():
    tau, d = sp.symbols("tau d", positive=True)
    assert sp.limit(tau * sp.log(1 + sp.exp(d / tau)), tau, 0, "+") == d
    assert sp.limit(tau * sp.log(1 + sp.exp(-d / tau)), tau, 0, "+") == 0
    # negative control: without the score 0 (the 1 in the log) a negative gap -d tends to -d, not 0
    assert sp.limit(tau * sp.log(sp.exp(-d / tau)), tau, 0, "+") == -d


def _scores():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(8, generator=gen, dtype=torch.float64) * 2 - 1


def test_package_smooth_max_value_is_the_definition_and_satisfies_the_sandwich():
    s = _scores()
    taus = torch.logspace(-3, 1, 60, dtype=torch.float64).tolist()
    values = torch.stack([losses.smooth_max(s, t) for t in taus])
    top, k = max(s.tolist()), len(s)
    for t, m in zip(taus, values.tolist()):
        assert abs(m - (top + t * math.log(sum(math.exp((x - top) / t) for x in s.tolist())))) < 1e-12
        assert top - 1e-12 <= m <= top + t * math.log(k) + 1e-12
    # negative controls: tau log of the mean falls below the maximum; log-sum-exp without tau rises above
    # the upper bound
    mean_exp = [m - t * math.log(k) for t, m in zip(taus, values.tolist())]
    assert any(v < top - 1e-9 for v in mean_exp)
    no_tau = [torch.logsumexp(s / t, 0).item() for t in taus]
    assert any(v > top + t * math.log(k) + 1e-9 for t, v in zip(taus, no_tau))


def test_package_smooth_max_at_tau_1e_3_is_within_the_theorems_bound():
    s = _scores()
    gap = losses.smooth_max(s, 1e-3).item() - s.max().item()
    assert 0 <= gap <= 1e-3 * math.log(len(s))
    # the bound is attained by equal scores, so no tighter tolerance would hold in general
    equal = torch.zeros(8, dtype=torch.float64)
    assert abs(losses.smooth_max(equal, 1e-3).item() - 1e-3 * math.log(8)) < 1e-15


def test_package_smooth_max_gradient_is_the_softmax():
    s = _scores().requires_grad_(True)
    losses.smooth_max(s, 0.1).backward()
    assert torch.allclose(s.grad, torch.softmax(s.detach() / 0.1, dim=0), atol=1e-12)
    # negative control: the softmax without 1/tau
    assert not torch.allclose(s.grad, torch.softmax(s.detach(), dim=0), atol=1e-3)


def test_knn_is_perfect_on_separated_clusters_and_at_chance_within_four_standard_errors():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    labels = torch.arange(2).repeat_interleave(2000)
    feats = centers[labels] + 0.5 * torch.randn(4000, 2, generator=gen)
    train, test = torch.arange(4000) % 2 == 0, torch.arange(4000) % 2 == 1
    assert knn_accuracy(feats[train], labels[train], feats[test], labels[test]) == 1.0
    shuffled = labels[torch.randperm(4000, generator=gen)]
    chance = knn_accuracy(feats[train], shuffled[train], feats[test], shuffled[test])
    assert abs(chance - 0.5) < 4 * math.sqrt(0.25 / int(test.sum()))
    # negative control: a vote by the least similar neighbours (the sign flipped) is not perfect
    assert knn_accuracy(feats[train], labels[train], -feats[test], labels[test]) < 1.0
