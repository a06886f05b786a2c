"""Chapter 3's statements: the Lab function f is invertible, the two-view bound, core view vs full graph."""

import math
from unittest import mock

import sympy as sp
import torch
import torch.nn.functional as F

from contrastive import augment
from contrastive.losses import multiview_info_nce
from contrastive.methods import build_method


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
    # negative control: the rounded constants eps = 0.008856, kappa = 903.3 miss in value and in slope
    eps_r, kappa_r = sp.Rational("0.008856"), sp.Rational("903.3")
    linear_r = (kappa_r * t + 16) / 116
    assert sp.N(cube.subs(t, eps_r) - linear_r.subs(t, eps_r), 30) != 0
    assert sp.N(sp.diff(cube, t).subs(t, eps_r) - sp.diff(linear_r, t), 30) != 0


def test_lab_round_trip_and_neutral_grays_and_their_wrong_variants():
    levels = torch.linspace(0, 1, 17, dtype=torch.float64)
    cube = torch.cartesian_prod(levels, levels, levels).T.reshape(1, 3, 17 * 17, 17)
    assert (augment.lab_to_rgb(augment.rgb_to_lab(cube)) - cube).abs().max() < 1e-9
    gray = torch.linspace(0, 1, 11, dtype=torch.float64).view(1, 1, 1, 11).expand(1, 3, 1, 11)
    assert augment.rgb_to_lab(gray)[:, 1:].abs().max() < 1e-12
    # negative controls: the forward conversion with the rounded constants; a D50 white point
    with (
        mock.patch.object(augment, "_LAB_KAPPA", 903.3),
        mock.patch.object(augment, "_LAB_EPSILON", 0.008856),
    ):
        rounded = augment.rgb_to_lab(cube)
    assert (augment.lab_to_rgb(rounded) - cube).abs().max() > 1e-9
    with mock.patch.object(augment, "_WHITE_D65", (0.96422, 1.0, 0.82521)):
        assert augment.rgb_to_lab(gray)[:, 1:].abs().max() > 1e-12


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


def _bound_and_se(n_pairs, k, batch_losses):
    values = n_pairs * math.log(k) - torch.tensor(batch_losses, dtype=torch.float64) / 2
    return values.mean().item(), values.std().item() / math.sqrt(len(values))


def test_three_gaussian_views_respect_pairwise_core_and_full_graph_bounds_within_four_standard_errors():
    rhos, d = (0.9, 0.6, 0.3), 4
    pairs = [(0, 1), (0, 2), (1, 2)]
    true_mi = {(i, j): -d / 2 * math.log(1 - rhos[i] * rhos[j]) for i, j in pairs}
    gen = torch.Generator().manual_seed(1)
    for k in (2, 16, 256):
        losses = {p: [] for p in pairs}
        for _ in range(30):
            s = torch.randn(k, d, generator=gen, dtype=torch.float64)
            v = [
                math.sqrt(p) * s + math.sqrt(1 - p) * torch.randn(k, d, generator=gen, dtype=torch.float64)
                for p in rhos
            ]
            for i, j in pairs:
                losses[i, j].append(pair_loss(v[i], v[j], math.sqrt(rhos[i] * rhos[j])))
        for p in pairs:
            bound, se = _bound_and_se(1, k, losses[p])
            assert bound <= true_mi[p] + 4 * se, (k, p)
        core = [a + b for a, b in zip(losses[0, 1], losses[0, 2])]
        bound, se = _bound_and_se(2, k, core)
        assert bound <= true_mi[0, 1] + true_mi[0, 2] + 4 * se
        full = [a + b + c for a, b, c in zip(*losses.values())]
        bound, se = _bound_and_se(3, k, full)
        assert bound <= sum(true_mi.values()) + 4 * se
    # At K = 256 the weakest pair's bound is close to its true value: the bound is not vacuous.
    assert _bound_and_se(1, 256, losses[1, 2])[0] > 0.8 * true_mi[1, 2]
    # negative controls: views 1,2's bound read as a bound on I(v1; v3); the core sum with C(3,2) log K
    bound, se = _bound_and_se(1, 256, losses[0, 1])
    assert not bound <= true_mi[0, 2] + 4 * se
    bound, se = _bound_and_se(3, 256, core)
    assert not bound <= true_mi[0, 1] + true_mi[0, 2] + 4 * se


def test_a_critic_fitted_to_the_batch_it_scores_exceeds_the_information_a_fixed_one_does_not():
    gen = torch.Generator().manual_seed(0)
    k, dim = 32, 32
    x, y = (torch.randn(k, dim, generator=gen, dtype=torch.float64) for _ in range(2))  # I = 0
    w = torch.zeros(dim, dim, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([w], lr=0.05)
    targets = torch.arange(k)

    def two_way(a, b):
        logits = a @ w @ b.T
        return F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)

    for _ in range(300):
        optimiser.zero_grad()
        two_way(x, y).backward()
        optimiser.step()
    with torch.no_grad():
        on_its_batch = math.log(k) - two_way(x, y).item() / 2
        fresh = torch.tensor(
            [
                math.log(k)
                - two_way(*(torch.randn(k, dim, generator=gen, dtype=torch.float64) for _ in range(2))).item()
                / 2
                for _ in range(400)
            ]
        )
    se = fresh.std().item() / math.sqrt(len(fresh))
    assert fresh.mean().item() <= 4 * se  # a fixed critic on independent batches: at most I = 0
    assert on_its_batch > 0.9 * math.log(k)  # fitted on its batch: near log K although I = 0


def _multiview_by_hand(views, tau, graph, both_directions=True, normalise=True):
    """The multiview loss and its gradient in each view's unnormalised rows, one term at a time."""
    k = len(views[0])
    rows = [view.tolist() for view in views]
    norms = [[math.sqrt(sum(x * x for x in u)) for u in view] for view in rows]
    z = [
        [[x / n for x in u] for u, n in zip(view, ns)] if normalise else view for view, ns in zip(rows, norms)
    ]
    grads = [[[0.0] * len(u) for u in view] for view in z]
    pairs = (
        [(0, j) for j in range(1, len(z))]
        if graph == "core"
        else [(i, j) for i in range(len(z)) for j in range(i + 1, len(z))]
    )
    value = 0.0
    for i, j in pairs:
        for a, b in ((i, j), (j, i)) if both_directions else ((i, j),):
            for n in range(k):
                s = [sum(p * q for p, q in zip(z[a][n], z[b][m])) / tau for m in range(k)]
                top = max(s)
                total = sum(math.exp(x - top) for x in s)
                value += (top + math.log(total) - s[n]) / k
                for m in range(k):
                    coef = (math.exp(s[m] - top) / total - (m == n)) / (k * tau)
                    grads[a][n] = [g + coef * x for g, x in zip(grads[a][n], z[b][m])]
                    grads[b][m] = [g + coef * x for g, x in zip(grads[b][m], z[a][n])]
    out = []
    for view_z, view_g, ns in zip(z, grads, norms):
        gz, zz = torch.tensor(view_g, dtype=torch.float64), torch.tensor(view_z, dtype=torch.float64)
        norm = torch.tensor(ns, dtype=torch.float64).unsqueeze(1)
        out.append((gz - (gz * zz).sum(1, keepdim=True) * zz) / norm if normalise else gz)
    return value, out


def _three_views():
    gen = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(5, 4, generator=gen, dtype=torch.float64)
            * (1 + torch.rand(5, 1, generator=gen, dtype=torch.float64))
        ).requires_grad_(True)
        for _ in range(3)
    ]


def test_package_multiview_info_nce_value_and_gradient_match_the_formula_for_both_graphs():
    tau = 0.5
    for graph in ("full", "core"):
        views = _three_views()
        loss = multiview_info_nce(views, tau, graph)
        loss.backward()
        value, grads = _multiview_by_hand([v.detach() for v in views], tau, graph)
        assert abs(loss.item() - value) < 1e-5 * value, graph
        for v, g in zip(views, grads):
            assert torch.allclose(v.grad, g, rtol=1e-4, atol=1e-6), graph


def test_package_multiview_info_nce_rejects_each_wrong_variant():
    tau = 0.5
    views = _three_views()
    loss = multiview_info_nce(views, tau, "full")
    loss.backward()
    detached = [v.detach() for v in views]
    wrong = {
        "one direction per pair": _multiview_by_hand(detached, tau, "full", both_directions=False)[0],
        "core graph": _multiview_by_hand(detached, tau, "core")[0],
        "no normalisation": _multiview_by_hand(detached, tau, "full", normalise=False)[0],
        "mean over pairs": loss.item() / 3,
        "no temperature": _multiview_by_hand(detached, 1.0, "full")[0],
    }
    for name, w in wrong.items():
        assert abs(loss.item() - w) > 1e-3, name
    unprojected = _multiview_by_hand(detached, tau, "full", normalise=False)[1]
    assert not torch.allclose(views[0].grad, unprojected[0], atol=1e-3)
    # two views: both graphs are the symmetric two-view loss
    two = detached[:2]
    assert (
        abs(multiview_info_nce(two, tau, "core").item() - multiview_info_nce(two, tau, "full").item()) < 1e-6
    )


def test_cmc_method_step_loss_gradient_and_logged_estimate_match_the_formulas():
    identity = augment.Recipe(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    torch.manual_seed(0)
    method = build_method("cmc", "convnet_tiny", recipe=identity)
    outputs = []

    def keep(module, inputs, out):
        out.retain_grad()
        outputs.append(out)

    hooks = [head.register_forward_hook(keep) for head in method.heads]
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=gen, dtype=torch.uint8)
    loss = method(images, torch.arange(8))
    loss.backward()
    for h in hooks:
        h.remove()
    u1, u2 = outputs
    value, (g1, g2) = _multiview_by_hand(
        [u1.detach().double(), u2.detach().double()], method.temperature, "full"
    )
    assert abs(loss.item() - value) < 1e-5 * value
    assert torch.allclose(u1.grad.double(), g1, rtol=1e-4, atol=1e-7)
    assert torch.allclose(u2.grad.double(), g2, rtol=1e-4, atol=1e-7)
    logged = method.epoch_metrics()["infonce_estimate"]
    assert abs(logged - (math.log(8) - value / 2)) < 1e-5
    # negative controls: one direction only; log K - L without the 1/2
    one_way = _multiview_by_hand(
        [u1.detach().double(), u2.detach().double()], method.temperature, "full", both_directions=False
    )[0]
    assert abs(loss.item() - one_way) > 1e-3
    assert abs(logged - (math.log(8) - value)) > 1e-3


def test_the_optimal_gaussian_critic_is_a_dot_product_at_temperature_one_minus_r2_over_r():
    gen = torch.Generator().manual_seed(0)
    r, d, k = 0.8, 5, 7
    x = torch.randn(1, d, generator=gen, dtype=torch.float64)
    y = F.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1) * 2.0  # equal norms
    optimal = log_ratio(x, y, r).softmax(1)
    tau = (1 - r**2) / r
    assert torch.allclose(optimal, (x @ y.T / tau).softmax(1), atol=1e-12)
    assert not torch.allclose(optimal, (x @ y.T).softmax(1), atol=1e-3)
