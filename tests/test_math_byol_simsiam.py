"""The BYOL and SimSiam chapters' statements: the normalised MSE and both losses with their stop-gradients,
the gradient of the negative cosine and what a discrete step does to |q|, the momentum schedule and the
target as an average of past online weights (Polyak averaging), SimSiam's gradient and the halved step
without a predictor, the alternating view and the predictor as a lower-variance estimate, and the two
collapse monitors. Every check is paired with a named wrong alternative that the same check rejects."""

import math

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from conftest import Keep

from contrastive.evaluate import effective_rank, output_std
from contrastive.losses import negative_cosine
from contrastive.methods import build_method
from contrastive.methods.momentum import TAU_BASE, cosine_momentum, ema_update


def g(a, b):
    """d(-cos(a, b)) / da row by row: -(b^ - cos(a, b) a^) / |a| (the negative cosine's gradient)."""
    a_hat, b_hat = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return -(b_hat - (a_hat * b_hat).sum(1, keepdim=True) * a_hat) / a.norm(dim=1, keepdim=True)


def D(p, z):
    """The negative cosine written out, one row at a time, mean over the batch."""
    return sum(-(p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(len(p))) / len(p)


def views(n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, 3, 32, 32, generator=gen, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# 1. BYOL's loss: the normalised MSE is 2 - 2 cos; the package's loss, value and stop-gradient
# ----------------------------------------------------------------------------------------------------------


def test_the_squared_distance_of_normalised_vectors_is_two_minus_two_cosine():
    a, b = sp.Matrix(sp.symbols("a1:4", real=True)), sp.Matrix(sp.symbols("b1:4", real=True))
    na, nb = sp.sqrt(a.dot(a)), sp.sqrt(b.dot(b))
    cos = a.dot(b) / (na * nb)
    diff = a / na - b / nb
    assert sp.simplify(diff.dot(diff) - (2 - 2 * cos)) == 0
    # without the normalisation the squared distance depends on the lengths, not only the angle
    assert sp.simplify((a - b).dot(a - b) - (2 - 2 * cos)) != 0


def test_negative_cosine_is_the_row_by_row_formula_and_not_the_other_axis():
    gen = torch.Generator().manual_seed(0)
    q, z = torch.randn(16, 8, generator=gen, dtype=torch.float64), torch.randn(16, 8, generator=gen).double()
    assert torch.allclose(negative_cosine(q, z), D(q, z), rtol=0, atol=1e-14)
    paper = (q / q.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)).pow(2).sum(1).mean()
    assert torch.allclose(paper, 2 + 2 * negative_cosine(q, z), rtol=0, atol=1e-12)
    # wrong alternatives: normalising over the batch (the other axis), no normalisation at all
    assert not torch.allclose(
        negative_cosine(q, z), -(F.normalize(q, dim=0) * F.normalize(z, dim=0)).sum(1).mean()
    )
    assert not torch.allclose(paper, 2 - 2 * (q * z).sum(1).mean(), atol=1e-6)


def summed_loss(pairs):
    """The BYOL paper's loss, one image at a time: sum over view orders of the mean ||q^ - z'^||^2."""
    return sum(
        sum(((q[i] / q[i].norm() - t[i] / t[i].norm()) ** 2).sum() for i in range(len(q))) / len(q)
        for q, t in pairs
    )


def test_byol_loss_pairs_each_prediction_with_the_other_views_target_and_stops_its_gradient():
    torch.manual_seed(0)
    model = build_method("byol", "convnet_tiny", 0).double()
    x1, x2 = views()
    model.target.requires_grad_(True)  # only the stop-gradient can now keep the gradient out of the target
    package = model.loss(x1, x2)
    package.backward()
    with torch.no_grad():
        q1, q2 = (model.predictor(model.projector(model.backbone(x))) for x in (x1, x2))
        t1, t2 = model.target(x1), model.target(x2)
    assert torch.allclose(summed_loss(((q1, t2), (q2, t1))), 4 + 4 * package.detach(), rtol=0, atol=1e-12)
    assert all(p.grad is None for p in model.target.parameters())
    assert all(p.grad is not None for p in model.backbone.parameters())
    # wrong alternative: each prediction against its own view's target
    assert not torch.allclose(summed_loss(((q1, t1), (q2, t2))), 4 + 4 * package.detach(), atol=1e-6)
    # wrong alternative: the target not stopped; computed with gradients on, it receives a gradient
    model.zero_grad(set_to_none=True)
    q1, q2 = (model.predictor(model.projector(model.backbone(x))) for x in (x1, x2))
    ((negative_cosine(q1, model.target(x2)) + negative_cosine(q2, model.target(x1))) / 2).backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.target.parameters())


def test_the_gradient_at_byols_predictions_is_g_of_q_and_the_other_views_target_over_2n():
    torch.manual_seed(0)
    model, keep = build_method("byol", "convnet_tiny", 0).double(), Keep()
    x1, x2 = views()
    hook = model.predictor.register_forward_hook(keep)
    model.loss(x1, x2).backward()
    hook.remove()
    q1, q2 = keep.outputs
    n = len(x1)
    with torch.no_grad():
        t1, t2 = model.target(x1), model.target(x2)
    for q, t in ((q1, t2), (q2, t1)):
        assert torch.allclose(q.grad, g(q.detach(), t) / (2 * n), rtol=0, atol=1e-12)
    # wrong alternatives: the same view's target; the sum over the view orders instead of their mean
    assert not torch.allclose(q1.grad, g(q1.detach(), t1) / (2 * n), atol=1e-6)
    assert not torch.allclose(q1.grad, g(q1.detach(), t2) / n, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# 2. The negative cosine's gradient: orthogonal to q, so |q| is fixed under gradient flow but a step grows it
# ----------------------------------------------------------------------------------------------------------


def test_the_negative_cosine_gradient_is_the_closed_form_and_orthogonal_to_q():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(negative_cosine(q, z) * len(q), q)
    q_norm = q.detach().norm(dim=1, keepdim=True)
    closed = g(q.detach(), z)
    assert torch.allclose(grad, closed, rtol=0, atol=1e-12)
    assert (grad * q.detach()).sum(1).abs().max() < 1e-12
    # wrong alternatives: the 1/|q| dropped; the cos * q_hat term dropped, which leaves a radial part
    assert not torch.allclose(grad, closed * q_norm, atol=1e-6)
    radial = -F.normalize(z, dim=1) / q_norm
    assert not torch.allclose(grad, radial, atol=1e-6)
    assert (radial * q.detach()).sum(1).abs().max() > 0.01


@pytest.mark.parametrize("eta", [1.0, 0.1, 0.01])
def test_a_discrete_step_along_the_orthogonal_gradient_lengthens_q_by_eta_squared_times_g_squared(eta):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(negative_cosine(q, z) * len(q), q)
    q0 = q.detach()
    growth = (q0 - eta * grad).pow(2).sum(1) - q0.pow(2).sum(1)
    assert torch.allclose(growth, eta**2 * grad.pow(2).sum(1), rtol=1e-6, atol=0)
    # wrong claim: "a step keeps |q| fixed"; only the limit eta -> 0 (gradient flow) does, growth / eta -> 0
    assert (growth > 0).all()
    assert (growth / eta).max() <= eta * grad.pow(2).sum(1).max() * (1 + 1e-9)
    # a gradient with a radial part changes |q|^2 to first order, by -2 eta <q, g>
    radial = -F.normalize(z, dim=1) / q0.norm(dim=1, keepdim=True)
    radial_change = (q0 - eta * radial).pow(2).sum(1) - q0.pow(2).sum(1)
    expected = -2 * eta * (q0 * radial).sum(1) + eta**2 * radial.pow(2).sum(1)
    assert torch.allclose(radial_change, expected, rtol=1e-9, atol=1e-15)
    assert 2 * (q0 * radial).sum(1).abs().mean() > 0.1


# ----------------------------------------------------------------------------------------------------------
# 3. The target's momentum schedule, the update, and the target as an average of past online weights
# ----------------------------------------------------------------------------------------------------------

k, K = sp.symbols("k K", positive=True)
tau_base = sp.Symbol("tau_base", positive=True)
TAU = 1 - (1 - tau_base) * (sp.cos(sp.pi * k / K) + 1) / 2


def test_the_schedule_starts_at_tau_base_and_ends_at_one():
    assert sp.simplify(TAU.subs(k, 0) - tau_base) == 0
    assert sp.simplify(TAU.subs(k, K) - 1) == 0
    # halfway the gap 1 - tau_base is half closed
    assert sp.simplify(TAU.subs(k, K / 2) - (1 + tau_base) / 2) == 0


def test_the_schedule_increases_for_every_tau_base_below_one_and_is_flat_at_the_ends():
    slope = sp.diff(TAU, k)
    assert sp.simplify(slope - (1 - tau_base) * sp.pi / (2 * K) * sp.sin(sp.pi * k / K)) == 0
    # sin(pi k / K) > 0 for 0 < k < K and 1 - tau_base > 0: strictly increasing, flat only at the ends
    assert slope.subs(k, 0) == 0 and sp.simplify(slope.subs(k, K)) == 0
    u = sp.Symbol("u", positive=True)  # k = u K with 0 < u < 1
    assert sp.simplify(slope.subs(k, u * K) * K / (sp.pi * (1 - tau_base) / 2) - sp.sin(sp.pi * u)) == 0
    # wrong alternative: a linear ramp has the same three values but is not flat at the ends
    linear = tau_base + (1 - tau_base) * k / K
    assert sp.simplify(linear.subs(k, K / 2) - (1 + tau_base) / 2) == 0
    assert sp.simplify(sp.diff(linear, k).subs(k, 0)) != 0


def test_the_package_schedule_is_the_formula_and_not_the_formula_backwards_or_one_minus_it():
    f = sp.lambdify((k, K, tau_base), TAU)
    backwards = sp.lambdify((k, K, tau_base), TAU.subs(k, K - k))
    for step, total, base in ((0, 100, 0.99), (37, 100, 0.99), (100, 100, 0.99), (5, 8, 0.996), (3, 10, 0.9)):
        assert cosine_momentum(step, total, base) == pytest.approx(f(step, total, base), abs=1e-15)
    assert abs(cosine_momentum(37, 100, 0.99) - backwards(37, 100, 0.99)) > 1e-3
    assert abs(cosine_momentum(37, 100, 0.99) - (1 - f(37, 100, 0.99))) > 0.5


def test_the_target_update_is_tau_xi_plus_one_minus_tau_theta_not_the_other_convention():
    torch.manual_seed(0)
    model = build_method("byol", "convnet_tiny", 0).double()
    with torch.no_grad():
        for p in [*model.backbone.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in [*model.backbone.parameters(), *model.projector.parameters()]]
    before = [p.detach().clone() for p in model.target.parameters()]
    model.on_step_end(300, 780)
    tau = cosine_momentum(300, 780)
    for xi_new, xi, theta in zip(model.target.parameters(), before, online):
        assert torch.allclose(xi_new, tau * xi + (1 - tau) * theta, rtol=0, atol=1e-12)
        assert not torch.allclose(xi_new, (1 - tau) * xi + tau * theta, rtol=0, atol=1e-6)


def run_ema(thetas, momenta, flip=False):
    xi, out = torch.zeros(thetas.shape[1], dtype=torch.float64), []
    for theta, tau in zip(thetas, momenta):
        ema_update([xi], [theta], 1 - tau if flip else tau)
        out.append(xi.clone())
    return torch.stack(out)


def test_with_tau_k_one_minus_one_over_k_plus_one_the_target_is_the_running_mean_polyak_averaging():
    thetas = torch.randn(50, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    running_mean = thetas.cumsum(0) / torch.arange(1, 51, dtype=torch.float64)[:, None]
    polyak = [i / (i + 1) for i in range(50)]
    assert torch.allclose(run_ema(thetas, polyak), running_mean, rtol=0, atol=1e-12)
    # wrong alternatives: the other momentum convention; a constant momentum
    assert not torch.allclose(run_ema(thetas, polyak, flip=True), running_mean, atol=1e-3)
    assert not torch.allclose(run_ema(thetas, [0.9] * 50), running_mean, atol=1e-3)


@pytest.mark.parametrize("total", [8, 780])
def test_the_target_is_the_weighted_average_with_weights_one_minus_tau_k_times_the_later_taus(total):
    momenta = torch.tensor([cosine_momentum(s, total, TAU_BASE) for s in range(total)], dtype=torch.float64)
    weights = torch.zeros(total + 1, dtype=torch.float64)
    weights[0] = 1  # coordinate 0: the initial target; coordinate k + 1: the online weights after step k
    for step, tau in enumerate(momenta.tolist()):
        ema_update([weights], [F.one_hot(torch.tensor(step + 1), total + 1).double()], tau)
    later = torch.cat([momenta.flip(0).cumprod(0).flip(0)[1:], torch.ones(1, dtype=torch.float64)])
    closed = torch.cat([momenta.prod().reshape(1), (1 - momenta) * later])
    assert torch.allclose(weights, closed, rtol=0, atol=1e-12)
    assert abs(weights.sum().item() - 1) < 1e-12 and (weights >= 0).all()
    # wrong alternative: the weights of the other convention
    assert not torch.allclose(
        weights, torch.cat([(1 - momenta).prod().reshape(1), momenta * later]), atol=1e-3
    )


# ----------------------------------------------------------------------------------------------------------
# 4. SimSiam: the objective, its gradient with and without the stop-gradient, the halved step
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_predictor", [True, False])
def test_simsiam_objective_and_its_gradient_are_the_theorems_with_and_without_the_stop_gradient(
    use_predictor,
):
    torch.manual_seed(0)
    n = 6
    z1, z2 = (torch.randn(n, 512, dtype=torch.float64, requires_grad=True) for _ in range(2))
    model = build_method("simsiam", "convnet_tiny", 0, predictor=use_predictor).double()
    model.eval()  # the predictor's BN uses running statistics, so rows do not interact
    p1, p2 = model.predictor(z1), model.predictor(z2)
    value = model.objective(z1, z2)
    assert torch.allclose(value, D(p1, z2) / 2 + D(p2, z1) / 2, rtol=0, atol=1e-12)
    assert not torch.allclose(value, D(p1, z1) / 2 + D(p2, z2) / 2, atol=1e-6)  # wrong: the same view
    (jac_part,) = torch.autograd.grad(p1, z1, g(p1, z2).detach() / (2 * n))
    target_part = g(z1, p2).detach() / (2 * n)
    grads = {}
    for stop in (True, False):
        model.stop_gradient = stop
        (grads[stop],) = torch.autograd.grad(model.objective(z1, z2), z1)
    assert torch.allclose(grads[True], jac_part, atol=1e-12)
    assert torch.allclose(grads[False], jac_part + target_part, atol=1e-12)
    # wrong alternatives: each setting against the other's formula
    assert not torch.allclose(grads[True], jac_part + target_part, atol=1e-6)
    assert not torch.allclose(grads[False], jac_part, atol=1e-6)
    # the two parts are equal for the identity predictor and only for it
    assert torch.allclose(target_part, jac_part, atol=1e-12) == (not use_predictor)


def encoder_grads(model, x1, x2, stop):
    model.stop_gradient = stop
    model.zero_grad(set_to_none=True)
    model.loss(x1, x2).backward()
    return torch.cat(
        [p.grad.flatten() for p in [*model.backbone.parameters(), *model.projector.parameters()]]
    )


@pytest.mark.parametrize("use_predictor", [False, True])
def test_without_a_predictor_the_stop_gradient_exactly_halves_every_encoder_gradient(use_predictor):
    x1, x2 = views(seed=1)
    torch.manual_seed(0)
    model = build_method("simsiam", "convnet_tiny", 0, predictor=use_predictor).double()
    stopped, free = encoder_grads(model, x1, x2, True), encoder_grads(model, x1, x2, False)
    # exactly half without a predictor; with one (the wrong alternative for the corollary) not
    assert torch.allclose(stopped, free / 2, rtol=1e-9, atol=1e-14) == (not use_predictor)


def sgd_run(x1, x2, stop, lr, weight_decay, steps=3):
    torch.manual_seed(0)
    model = build_method("simsiam", "convnet_tiny", 0, predictor=False).double()
    model.stop_gradient = stop
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        model.loss(x1, x2).backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_without_a_predictor_sgd_with_the_stop_gradient_is_sgd_without_it_at_half_the_rate():
    x1, x2 = views(seed=1)
    lr, weight_decay = 0.05, 5e-4
    reference = sgd_run(x1, x2, True, lr, weight_decay)
    assert torch.allclose(reference, sgd_run(x1, x2, False, lr / 2, 2 * weight_decay), rtol=0, atol=1e-12)
    # wrong alternatives: the same rate; half the rate with the weight decay left as it was
    assert not torch.allclose(reference, sgd_run(x1, x2, False, lr, weight_decay), atol=1e-6)
    assert not torch.allclose(reference, sgd_run(x1, x2, False, lr / 2, weight_decay), rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# 5. SimSiam as alternating optimisation; the predictor as a lower-variance estimate of the mean
# ----------------------------------------------------------------------------------------------------------


def test_the_minimiser_over_eta_of_the_expected_squared_error_is_the_mean_over_augmentations():
    outputs = [sp.Matrix(sp.symbols(f"f{j}_1:3", real=True)) for j in range(3)]  # F(T_j(x)), 3 augmentations
    eta = sp.Matrix(sp.symbols("eta1:3", real=True))
    loss = sum(((f - eta).dot(f - eta) for f in outputs), sp.Integer(0)) / len(outputs)
    gradient = [sp.diff(loss, e) for e in eta]
    solution = sp.solve(gradient, list(eta), dict=True)
    mean = sum(outputs, sp.zeros(2, 1)) / len(outputs)
    assert len(solution) == 1
    assert all(sp.simplify(solution[0][e] - m) == 0 for e, m in zip(eta, mean))
    # the Hessian is 2 I, positive definite: the stationary point is the minimum
    assert sp.hessian(loss, list(eta)) == 2 * sp.eye(2)
    # one augmentation's output is not stationary unless it is the mean
    assert any(sp.simplify(g.subs(dict(zip(eta, outputs[0])))) != 0 for g in gradient)


def test_one_sample_is_unbiased_and_the_least_squares_predictor_has_lower_variance():
    s_x, s_e, w = sp.symbols("sigma_x sigma_e w", positive=True)
    risk = w**2 * (s_x**2 + s_e**2) - 2 * w * s_x**2 + s_x**2 + s_e**2  # E (w z1 - z2)^2, z_i = x + e_i
    w_star = sp.solve(sp.diff(risk, w), w)[0]
    assert sp.simplify(w_star - s_x**2 / (s_x**2 + s_e**2)) == 0
    assert sp.simplify((1 - w_star) ** 2 * s_x**2 + w_star**2 * s_e**2 - w_star * s_e**2) == 0
    gen = torch.Generator().manual_seed(0)
    m, dim, sx, se = 50_000, 8, 1.0, 0.75
    x = sx * torch.randn(m, dim, generator=gen, dtype=torch.float64)
    v1, v2 = (x + se * torch.randn(m, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    slope = torch.linalg.lstsq(v1, v2).solution
    w_val = sx**2 / (sx**2 + se**2)
    se_slope = math.sqrt((1 - w_val**2) / m)  # standard error of one fitted coefficient
    eye = torch.eye(dim, dtype=torch.float64)
    assert (slope - w_val * eye).abs().max() < 5 * se_slope
    assert not (slope - eye).abs().max() < 5 * se_slope  # wrong: the identity, the sample as it is
    err_sample, err_pred = v1 - x, v1 @ slope - x
    tol = 5 * math.sqrt(2 / (m * dim))  # 5 standard errors of a mean square, relative to its variance
    assert abs(err_sample.pow(2).mean().item() - se**2) < tol * se**2
    assert abs(err_pred.pow(2).mean().item() - w_val * se**2) < tol * w_val * se**2
    assert not abs(err_pred.pow(2).mean().item() - se**2) < tol * se**2  # wrong: the sample's variance
    # unbiased given x: no slope of the error on x (within 5 SE); the prediction has slope w - 1
    se_bias = se / math.sqrt(x.pow(2).sum().item())
    assert abs(((err_sample * x).sum() / x.pow(2).sum()).item()) < 5 * se_bias
    pred_bias = ((err_pred * x).sum() / x.pow(2).sum()).item()  # the fitted slope minus 1, plus w e's noise
    assert abs(pred_bias - (slope.diagonal().mean().item() - 1)) < 5 * se_bias
    assert not abs(pred_bias) < 5 * se_bias


# ----------------------------------------------------------------------------------------------------------
# 6. The output std: 1/sqrt(d) on the sphere, 0 when collapsed, 1/sqrt(d) again for a line through BN
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 8, 32, 128, 512])
def test_uniform_directions_have_per_dimension_std_one_over_sqrt_d(d):
    n = 20_000
    gen = torch.Generator().manual_seed(d)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)  # normalised inside: uniform on the sphere
    # Each coordinate x of a uniform unit vector has E x^2 = 1/d and E x^4 = 3 / (d (d + 2)), so the
    # sample variance has relative standard error sqrt((3d / (d + 2) - 1) / n) and the std half that.
    # Five of those, for one coordinate alone, bound the error of the mean over d coordinates.
    tolerance = 5 * math.sqrt((3 * d / (d + 2) - 1) / n) / 2
    assert output_std(z).item() == pytest.approx(1 / math.sqrt(d), rel=tolerance)
    if d >= 8:  # 1/d, the std of the unnormalised guess, is rejected
        assert output_std(z).item() != pytest.approx(1 / d, rel=0.5)


def test_collapsed_outputs_have_zero_std_whatever_their_length():
    direction = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    lengths = torch.rand(100, 1, generator=torch.Generator().manual_seed(1)) * 10 + 0.1
    assert output_std(direction * lengths).item() == pytest.approx(0, abs=1e-6)
    # collapse to a few directions is not complete collapse: the std stays positive
    two = torch.cat([direction.expand(50, -1), -direction.expand(50, -1)])
    assert output_std(two).item() > 0.01


def test_a_line_through_an_affine_free_bn_has_the_std_of_spread_outputs_and_rank_one():
    gen = torch.Generator().manual_seed(0)
    line = torch.randn(256, 1, generator=gen) * torch.randn(1, 512, generator=gen)  # z_n = s_n u
    z = torch.nn.BatchNorm1d(512, affine=False)(line)
    assert abs(output_std(z).item() * math.sqrt(512) - 1) < 0.02 and effective_rank(z).item() < 1.01
    # the same line without the BN: the std test does not pass it as spread
    assert not abs(output_std(line).item() * math.sqrt(512) - 1) < 0.02


# ----------------------------------------------------------------------------------------------------------
# 7. The effective rank: what the output std cannot see
# ----------------------------------------------------------------------------------------------------------


def test_effective_rank_is_exp_of_the_entropy_of_the_normalised_singular_values():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(50, 6, generator=gen, dtype=torch.float64) * torch.tensor([1, 1, 1, 0.5, 0.2, 0.1])
    s = torch.linalg.svdvals(z / z.norm(dim=1, keepdim=True))
    p = s / s.sum()
    assert effective_rank(z).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
    # wrong alternatives: the squared singular values (eigenvalues), and rows left unnormalised
    p2 = s**2 / (s**2).sum()
    assert effective_rank(z).item() != pytest.approx(math.exp(-(p2 * p2.log()).sum().item()), rel=1e-3)
    s_raw = torch.linalg.svdvals(z)
    p_raw = s_raw / s_raw.sum()
    assert effective_rank(z).item() != pytest.approx(math.exp(-(p_raw * p_raw.log()).sum().item()), rel=1e-3)
    # equal singular values give exactly the dimension: rows of a scaled identity
    assert effective_rank(3 * torch.eye(7)).item() == pytest.approx(7, rel=1e-6)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_an_evenly_spread_rotated_k_dimensional_collapse_has_effective_rank_k_and_an_uneven_one_less(k):
    d, n = 128, 20_000
    gen = torch.Generator().manual_seed(k)
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    z = torch.randn(n, k, generator=gen, dtype=torch.float64) @ basis.T
    assert effective_rank(z).item() == pytest.approx(k, rel=0.02)
    if k > 1:  # the std sees almost nothing: within 15% of the spread value
        assert output_std(z).item() * math.sqrt(d) > 0.85
        # the same subspace with standard deviations 1, 1/2, 1/4, ... along its axes: rank below k
        scales = 2.0 ** -torch.arange(k, dtype=torch.float64)
        uneven = (torch.randn(n, k, generator=gen, dtype=torch.float64) * scales) @ basis.T
        assert effective_rank(uneven).item() < k - 0.2
    spread = torch.randn(n, d, generator=gen, dtype=torch.float64)
    assert effective_rank(spread).item() > 0.95 * d


def test_effective_rank_of_complete_collapse_is_one_and_bad_shapes_are_refused():
    direction = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    lengths = torch.rand(200, 1, generator=torch.Generator().manual_seed(1)) + 0.1
    assert effective_rank(direction * lengths).item() == pytest.approx(1, abs=1e-5)
    for bad in (torch.zeros(0, 4), torch.zeros(5)):
        with pytest.raises(ValueError, match="non-empty"):
            effective_rank(bad)
