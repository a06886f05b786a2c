"""The SimCLR chapter's statements: NT-Xent's gradient, its hardness awareness, Wang and Isola's limit."""

import math

import sympy as sp
import torch
import torch.nn.functional as F

from contrastive.evaluate import alignment, uniformity
from contrastive.losses import info_nce, nt_xent
from contrastive.methods import build_method

# ----------------------------------------------------------------------------------------------------------
# 1. The gradient of one anchor's loss, on the sphere and through the normalisation
# ----------------------------------------------------------------------------------------------------------


def anchor_loss(z: torch.Tensor, i: int, j: int, tau: float) -> torch.Tensor:
    """l_i = -log exp(z_i.z_j/tau) / sum_{k != i} exp(z_i.z_k/tau), rows of z taken as they are."""
    logits = torch.stack([z[i] @ z[k] for k in range(len(z)) if k != i]) / tau
    return -(z[i] @ z[j]) / tau + torch.logsumexp(logits, 0)


def closed_form_gradient(z: torch.Tensor, i: int, j: int, tau: float) -> torch.Tensor:
    """(1/tau) (sum_{k != i} p_ik z_k - z_j), p_ik the softmax weights of the anchor's scores."""
    others = [k for k in range(len(z)) if k != i]
    p = (z[others] @ z[i] / tau).softmax(0)
    return (p @ z[others] - z[j]) / tau


def test_anchor_gradient_is_the_softmax_average_minus_the_positive_over_tau():
    gen = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(6, 5, generator=gen, dtype=torch.float64), dim=1)
    for tau in (0.1, 0.5, 2.0):
        zi = z[0].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(anchor_loss(torch.cat([zi[None], z[1:]]), 0, 3, tau), zi)
        assert torch.allclose(grad, closed_form_gradient(z, 0, 3, tau), atol=1e-12)
        # Leaving the positive out of the softmax weights (negatives only) gives another vector.
        negatives = [1, 2, 4, 5]
        q = (z[negatives] @ z[0] / tau).softmax(0)
        assert (grad - (q @ z[negatives] - z[3]) / tau).norm() > 1e-2


def test_gradient_through_the_normalisation_is_the_tangent_projection_over_the_norm():
    gen = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(6, 5, generator=gen, dtype=torch.float64), dim=1)
    tau = 0.5
    u = (2.7 * z[0]).requires_grad_(True)  # any u with u / ||u|| = z_0
    (grad_u,) = torch.autograd.grad(
        anchor_loss(torch.cat([F.normalize(u, dim=0)[None], z[1:]]), 0, 3, tau), u
    )
    grad_z, norm = closed_form_gradient(z, 0, 3, tau), u.detach().norm()
    projector = torch.eye(5, dtype=torch.float64) - torch.outer(z[0], z[0])
    assert torch.allclose(grad_u, projector @ grad_z / norm, atol=1e-12)
    assert abs(grad_u @ u.detach()) < 1e-12  # the loss does not depend on ||u||: no radial component
    # Dividing the free-vector gradient by ||u|| without projecting is wrong.
    assert (grad_u - grad_z / norm).norm() > 1e-2


def test_package_nt_xent_gradient_sums_every_anchors_closed_form():
    # Each view is an anchor once and a positive or negative in every other anchor's term:
    # dL/dz = ((P - E) + (P - E)^T) z / (2N tau), with P the row softmax without the diagonal and
    # E the positive indicator; then dL/du_m = (I - z_m z_m^T) dL/dz_m / ||u_m||.
    gen = torch.Generator().manual_seed(2)
    n, d, tau = 4, 6, 0.5
    u = torch.randn(2 * n, d, generator=gen, dtype=torch.float64).requires_grad_(True)
    (grad_u,) = torch.autograd.grad(nt_xent(u[:n], u[n:], tau), u)
    u = u.detach()
    z = F.normalize(u, dim=1)
    p = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf")).softmax(1)
    e = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    e[torch.arange(2 * n), (torch.arange(2 * n) + n) % (2 * n)] = 1
    grad_z = ((p - e) + (p - e).T) @ z / (2 * n * tau)
    expected = (grad_z - (grad_z * z).sum(1, keepdim=True) * z) / u.norm(dim=1, keepdim=True)
    assert torch.allclose(grad_u, expected, atol=1e-6)  # nt_xent computes its softmax in float32
    # Only the anchors' own terms (dropping the transpose) is not the gradient.
    only_anchor = ((p - e) @ z / (2 * n * tau)) - ((p - e) @ z / (2 * n * tau) * z).sum(1, keepdim=True) * z
    assert not torch.allclose(grad_u, only_anchor / u.norm(dim=1, keepdim=True), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# 2. Hardness awareness: the negatives' weights are a Boltzmann distribution at temperature tau
# ----------------------------------------------------------------------------------------------------------

TAU = sp.Symbol("tau", positive=True)


def test_weight_of_each_score_in_the_gradient_is_its_boltzmann_factor_over_tau():
    s_pos, negatives = sp.Symbol("s_p", real=True), sp.symbols("s1:4", real=True)
    z = sp.exp(s_pos / TAU) + sum(sp.exp(s / TAU) for s in negatives)
    loss = -s_pos / TAU + sp.log(z)
    for s in negatives:
        assert sp.simplify(sp.diff(loss, s) - sp.exp(s / TAU) / z / TAU) == 0
    assert sp.simplify(sp.diff(loss, s_pos) - (sp.exp(s_pos / TAU) / z - 1) / TAU) == 0
    # Without the 1/tau the weight is wrong.
    assert sp.simplify(sp.diff(loss, negatives[0]) - sp.exp(negatives[0] / TAU) / z) != 0


def test_as_tau_goes_to_zero_all_weight_goes_to_the_hardest_negative_and_to_infinity_it_spreads_evenly():
    s1, a, b = sp.Symbol("s1", real=True), sp.Symbol("a", positive=True), sp.Symbol("b", positive=True)
    scores = [s1, s1 - a, s1 - a - b]  # s1 > s2 > s3 for any gaps a, b > 0
    z = sum(sp.exp(s / TAU) for s in scores)
    weights = [sp.exp(s / TAU) / z for s in scores]
    # Dividing through by exp(s1 / tau) leaves only the gaps, which is what the limits need.
    shifted = [sp.exp((s - s1) / TAU) / sum(sp.exp((t - s1) / TAU) for t in scores) for s in scores]
    assert all(sp.simplify(w - v) == 0 for w, v in zip(weights, shifted))
    assert [sp.limit(w, TAU, 0, "+") for w in shifted] == [1, 0, 0]
    assert [sp.limit(w, TAU, sp.oo) for w in shifted] == [sp.Rational(1, 3)] * 3
    # With the sign of the scores flipped the weight goes to the easiest negative instead.
    flipped = [sp.exp((s1 - s) / TAU) / sum(sp.exp((s1 - t) / TAU) for t in scores) for s in scores]
    assert [sp.limit(w, TAU, 0, "+") for w in flipped] == [0, 0, 1]


def test_tau_times_the_loss_tends_to_a_zero_margin_hinge_on_the_hardest_negative():
    negatives = [sp.Rational(1, 2), sp.Rational(1, 5), sp.Rational(-1, 3)]
    hardest, limits = max(negatives), {}
    for s_pos in (sp.Rational(3, 10), sp.Rational(7, 10)):  # hardest negative above, then below, the positive
        terms = [s_pos, *negatives]
        z = sum(sp.exp(s / TAU) for s in terms)
        limits[s_pos] = sp.limit(TAU * (-s_pos / TAU + sp.log(z)), TAU, 0, "+")
        assert limits[s_pos] == max(0, hardest - s_pos)
        weights = [sp.limit(sp.exp(s / TAU) / z, TAU, 0, "+") for s in terms]
        # All the weight on the largest score: the hardest negative when it beats the positive, else none.
        assert weights == ([0, 1, 0, 0] if hardest > s_pos else [1, 0, 0, 0])
        assert [sp.limit(sp.exp(s / TAU) / z, TAU, sp.oo) for s in terms] == [sp.Rational(1, 4)] * 4
    # The hinge has no margin and acts on the hardest negative, not on the mean one.
    s_pos = sp.Rational(3, 10)
    assert limits[s_pos] == sp.Rational(1, 5)
    assert limits[s_pos] != hardest - s_pos + sp.Rational(1, 10)
    assert limits[s_pos] != max(0, sum(negatives) / 3 - s_pos)


# ----------------------------------------------------------------------------------------------------------
# 3. Wang and Isola 2020: L_M - log M tends to -E[s_pos]/tau + E_x log E_{x-} exp(s_neg/tau)
# ----------------------------------------------------------------------------------------------------------


def sphere_moment(d: int, kappa: float) -> float:
    """E exp(kappa x.w), x a unit vector, w uniform on S^(d-1): Gamma(nu+1) (2/kappa)^nu I_nu(kappa).

    nu = d/2 - 1; by symmetry the value does not depend on x.
    """
    nu = sp.Rational(d, 2) - 1
    return float(
        (sp.gamma(nu + 1) * (2 / sp.nsimplify(kappa)) ** nu * sp.besseli(nu, sp.nsimplify(kappa))).evalf(30)
    )


def test_sphere_moment_closed_form_matches_the_integral_over_the_marginal_of_one_coordinate():
    t = sp.Symbol("t")
    for d, kappa in ((8, 2), (8, 4), (3, 1)):
        density = (1 - t**2) ** sp.Rational(d - 3, 2)  # the marginal of one coordinate, unnormalised
        integral = sp.Integral(sp.exp(kappa * t) * density, (t, -1, 1)).evalf(30)
        mass = sp.Integral(density, (t, -1, 1)).evalf(30)
        assert abs(float(integral / mass) - sphere_moment(d, kappa)) < 1e-12
        # nu = d/2 instead of d/2 - 1 (the dimension of the ambient space, not of the sphere): rejected
        nu = sp.Rational(d, 2)
        wrong = sp.gamma(nu + 1) * (2 / sp.Integer(kappa)) ** nu * sp.besseli(nu, sp.Integer(kappa))
        assert abs(float(integral / mass) - float(wrong.evalf(30))) > 1e-3


def test_l_m_minus_log_m_approaches_the_limit_at_rate_one_over_m():
    d, tau, n, chunk, m_max = 8, 0.5, 4000, 500, 1024
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    y = F.normalize(x + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    s_pos = (x * y).sum(1)
    # Negatives uniform on the sphere: by symmetry E_{x-} exp(x.x-/tau) = Z, the same for every x.
    z = sphere_moment(d, 1 / tau)
    limit = (-s_pos / tau).mean().item() + math.log(z)
    neg_exp = torch.empty(n, m_max, dtype=torch.float64)  # exp(s_neg / tau), fresh negatives per anchor
    for start in range(0, n, chunk):
        negatives = F.normalize(torch.randn(chunk, m_max, d, generator=gen, dtype=torch.float64), dim=2)
        neg_exp[start : start + chunk] = (
            (negatives @ x[start : start + chunk, :, None]).squeeze(2).div(tau).exp()
        )
        if start == 0:  # L_M here is the package's InfoNCE, with the negatives shared by the chunk
            shared = negatives[:, 0]
            mine = -s_pos[:chunk] / tau + torch.log(
                (s_pos[:chunk] / tau).exp() + (x[:chunk] @ shared.T / tau).exp().sum(1)
            )
            assert abs(info_nce(x[:chunk], y[:chunk], shared, tau).item() - mine.mean().item()) < 1e-5
    # The inner expectation in closed form agrees with 4M Monte Carlo draws (within 4 standard errors).
    assert abs(neg_exp.mean().item() - z) < 4 * neg_exp.std().item() / math.sqrt(neg_exp.numel())

    # gap(M) = E[L_M] - log M - limit = E log(exp(s_pos/tau)/M + mean_M exp(s_neg/tau)) - log Z.
    # Subtracting the control variate (mean_M - Z)/Z, whose mean is exactly 0, keeps the mean and removes
    # the O(1/sqrt(M n)) noise, so the O(1/M) gap is resolved at every M.
    pos_exp, raw, scaled = (s_pos / tau).exp(), {}, {}
    for m in (16, 64, 256, 1024):
        sample_mean = neg_exp[:, :m].mean(1)
        loss = -s_pos / tau + torch.log(pos_exp + neg_exp[:, :m].sum(1))  # L_M, one term per anchor
        raw[m] = loss.mean().item() - math.log(m) - limit
        per_anchor = torch.log(pos_exp / m + sample_mean) - math.log(z)
        assert abs(per_anchor.mean().item() - raw[m]) < 1e-10  # the same quantity, rearranged
        scaled[m] = m * (per_anchor - (sample_mean - z) / z)  # M gap per anchor, control variate removed
        assert abs(scaled[m].mean().item() / m - raw[m]) < 4 * per_anchor.std().item() / math.sqrt(n)
    assert abs(raw[16]) > abs(raw[64]) > abs(raw[256]) > abs(raw[1024]) and abs(raw[1024]) < 0.005
    # Leading term, from log(Z (1 + e)) with e = exp(s_pos/tau)/(M Z) + (mean_M - Z)/Z:
    # M gap -> E[exp(s_pos/tau)]/Z - Var(exp(s_neg/tau)) / (2 Z^2); the second part is Jensen's bias.
    # M gap = C + C2 / M + O(1/M^2): (4 M' gap(M') - M gap(M)) / 3 with M' = 4M removes C2 / M.
    variance = sphere_moment(d, 2 / tau) - z**2
    a = pos_exp / z  # the anchors' own part of the constant, shared by estimate and prediction
    leading = a.mean().item() - variance / (2 * z**2)
    for m in (64, 256):
        extrapolated = (4 * scaled[4 * m] - scaled[m]) / 3
        se = (extrapolated - a).std().item() / math.sqrt(n)
        assert abs(extrapolated.mean().item() - leading) < 4 * se, m
        # Keeping only exp(s_pos/tau)/(M Z), as if the M negatives averaged to exactly Z: rejected.
        assert abs(extrapolated.mean().item() - a.mean().item()) > 4 * se, m
        # A gap of order 1/sqrt(M) would make M gap grow like sqrt(M): not what the estimates do.
        assert abs(scaled[4 * m].mean().item() - scaled[m].mean().item()) < 0.5 * leading


def test_alignment_and_uniformity_are_wang_and_isolas_definitions():
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(7, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    fa, fb = F.normalize(a, dim=1).tolist(), F.normalize(b, dim=1).tolist()

    def sq(p, q):
        return sum((s - t) ** 2 for s, t in zip(p, q))

    # alignment: E ||f(x) - f(y)||^alpha over the positive pairs, on normalised embeddings.
    for alpha in (2, 1):
        direct = sum(sq(p, q) ** (alpha / 2) for p, q in zip(fa, fb)) / 7
        assert math.isclose(alignment(a, b, alpha=alpha).item(), direct, rel_tol=1e-12)
    # uniformity: log E exp(-2 ||f(x) - f(y)||^2) over the 21 distinct pairs.
    pairs = [math.exp(-2 * sq(fa[i], fa[j])) for i in range(7) for j in range(i + 1, 7)]
    assert math.isclose(uniformity(a).item(), math.log(sum(pairs) / len(pairs)), rel_tol=1e-12)
    # Counting each point with itself (exp(0) = 1) or skipping the normalisation gives other numbers.
    with_self = math.log((2 * sum(pairs) + 7) / 49)
    assert abs(uniformity(a).item() - with_self) > 1e-2
    raw = [math.exp(-2 * sq(a[i].tolist(), a[j].tolist())) for i in range(7) for j in range(i + 1, 7)]
    assert abs(uniformity(a).item() - math.log(sum(raw) / len(raw))) > 1e-2


def test_uniform_points_on_the_sphere_reach_the_closed_form_and_beat_a_cap():
    d, n = 8, 2000
    gen = torch.Generator().manual_seed(4)
    spread = torch.randn(n, d, generator=gen, dtype=torch.float64)
    pole = torch.zeros(d, dtype=torch.float64)
    pole[0] = 1
    cap = pole + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    # Uniform x, y: ||x - y||^2 = 2 - 2 x.y, so E exp(-2 ||x - y||^2) = e^-4 E exp(4 x.y).
    mean_h = math.exp(-4) * sphere_moment(d, 4)
    expected = math.log(mean_h)
    # The mean over pairs is a U-statistic; by symmetry E_y h(x, y) does not depend on x, so its variance
    # is 2 Var(h) / (n (n - 1)), and the logarithm divides the standard error by E h.
    var_h = math.exp(-8) * sphere_moment(d, 8) - mean_h**2
    se = math.sqrt(2 * var_h / (n * (n - 1))) / mean_h
    assert abs(uniformity(spread).item() - expected) < 4 * se
    assert abs(uniformity(spread).item() - (-2 + math.log(sphere_moment(d, 2)))) > 4 * se  # t = 1: rejected
    assert uniformity(cap).item() > uniformity(spread).item() + 1


def test_gradient_with_respect_to_the_positive_and_each_negative_as_chapter_six_exercise_one_states():
    # d l_i / d z_k = p_ik z_i / tau for a negative k, (p_ij - 1) z_i / tau for the positive j.
    gen = torch.Generator().manual_seed(5)
    z = F.normalize(torch.randn(8, 5, generator=gen, dtype=torch.float64), dim=1).requires_grad_(True)
    i, j, tau = 0, 4, 0.3
    anchor_loss(z, i, j, tau).backward()
    with torch.no_grad():
        p = torch.stack([z[i] @ z[k] for k in range(8)]) / tau
        p[i] = -math.inf
        p = p.softmax(0)
        for k in range(1, 8):
            expected = (p[k] - (1.0 if k == j else 0.0)) * z[i] / tau
            assert torch.allclose(z.grad[k], expected, atol=1e-12), k
        assert not torch.allclose(z.grad[j], p[j] * z[i] / tau, atol=1e-6)  # the positive's -1 matters


# ----------------------------------------------------------------------------------------------------------
# 4. The package's NT-Xent pinned, and the run's geometry metrics
# ----------------------------------------------------------------------------------------------------------


def nt_xent_loops(u1, u2, tau, variant="definition"):
    """NT-Xent one anchor and one candidate at a time. variant="no self-mask" counts each anchor among its
    own negatives; "other branch only" keeps the other view's candidates alone. Both are wrong variants."""
    views = [v / v.norm() for v in torch.cat([u1, u2])]
    size, half = len(views), len(views) // 2
    total = 0
    for i in range(size):
        j = (i + half) % size
        if variant == "no self-mask":
            candidates = range(size)
        elif variant == "other branch only":
            candidates = [k for k in range(size) if (k < half) != (i < half)]
        else:
            candidates = [k for k in range(size) if k != i]
        denominator = sum(torch.exp(views[i] @ views[k] / tau) for k in candidates)
        total = total - torch.log(torch.exp(views[i] @ views[j] / tau) / denominator)
    return total / size


def test_package_nt_xent_is_the_loop_definition_in_value_and_gradient_and_not_its_near_misses():
    gen = torch.Generator().manual_seed(6)
    n, tau = 4, 0.5
    u = torch.randn(2 * n, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = nt_xent(u[:n], u[n:], tau)
    (grad,) = torch.autograd.grad(loss, u)
    for variant in ("definition", "no self-mask", "other branch only"):
        reference = nt_xent_loops(u[:n], u[n:], tau, variant)
        (reference_grad,) = torch.autograd.grad(reference, u)
        value_gap, grad_gap = abs(loss.item() - reference.item()), (grad - reference_grad).abs().max().item()
        if variant == "definition":
            assert value_gap < 1e-6 and grad_gap < 1e-6  # nt_xent's softmax runs in float32
        else:
            assert value_gap > 1e-2 and grad_gap > 1e-2, variant


def test_the_logged_geometry_is_the_definitions_and_lower_means_closer_pairs_and_wider_spread():
    # The chapter's run check reads "alignment and uniformity fell" as improvement: lower must mean better.
    method = build_method("simclr", "convnet_tiny", 0)
    gen = torch.Generator().manual_seed(7)
    z1 = torch.randn(64, 16, generator=gen)
    z2 = z1 + 0.1 * torch.randn(64, 16, generator=gen)
    method.log_geometry(z1, z2)
    good = method.epoch_metrics()
    assert abs(good["alignment"] - alignment(z1, z2).item()) < 1e-6
    assert abs(good["uniformity"] - uniformity(z1).item()) < 1e-6
    bunched = torch.ones(64, 16) + 0.01 * torch.randn(64, 16, generator=gen)
    method.log_geometry(bunched, -bunched)  # positives on opposite poles, every view in one place
    bad = method.epoch_metrics()
    assert bad["alignment"] > good["alignment"] and bad["uniformity"] > good["uniformity"]
    # With the sign convention reversed, the same comparison would call the bad batch better.
    assert not (-bad["alignment"] > -good["alignment"] or -bad["uniformity"] > -good["uniformity"])
