"""The BYOL and SimSiam chapters' statements: the normalised MSE, the momentum schedule, SimSiam's
alternating view, and the output std that tells spread outputs from collapsed ones."""

import math

import pytest
import sympy as sp
import torch

from contrastive.evaluate import effective_rank, output_std
from contrastive.losses import negative_cosine
from contrastive.methods.momentum import cosine_momentum

# ----------------------------------------------------------------------------------------------------------
# 1. BYOL's loss: the normalised MSE is 2 - 2 cos
# ----------------------------------------------------------------------------------------------------------


def test_the_squared_distance_of_normalised_vectors_is_two_minus_two_cosine():
    a, b = sp.Matrix(sp.symbols("a1:4", real=True)), sp.Matrix(sp.symbols("b1:4", real=True))
    na, nb = sp.sqrt(a.dot(a)), sp.sqrt(b.dot(b))
    cos = a.dot(b) / (na * nb)
    diff = a / na - b / nb
    assert sp.simplify(diff.dot(diff) - (2 - 2 * cos)) == 0
    # without the normalisation the squared distance depends on the lengths, not only the angle
    assert sp.simplify((a - b).dot(a - b) - (2 - 2 * cos)) != 0


def test_the_package_loss_in_the_paper_form_is_two_plus_two_d():
    gen = torch.Generator().manual_seed(0)
    q, z = torch.randn(16, 8, generator=gen, dtype=torch.float64), torch.randn(16, 8, generator=gen).double()
    paper = (q / q.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)).pow(2).sum(1).mean()
    assert torch.allclose(paper, 2 + 2 * negative_cosine(q, z), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# 2. The target's momentum schedule
# ----------------------------------------------------------------------------------------------------------

k, K = sp.symbols("k K", positive=True)
tau_base = sp.Symbol("tau_base", positive=True)
TAU = 1 - (1 - tau_base) * (sp.cos(sp.pi * k / K) + 1) / 2


def test_the_schedule_starts_at_tau_base_and_ends_at_one():
    assert sp.simplify(TAU.subs(k, 0) - tau_base) == 0
    assert sp.simplify(TAU.subs(k, K) - 1) == 0
    # halfway the gap 1 - tau_base is half closed
    assert sp.simplify(TAU.subs(k, K / 2) - (1 + tau_base) / 2) == 0


def test_the_schedule_increases_for_every_tau_base_below_one():
    slope = sp.diff(TAU, k)
    assert sp.simplify(slope - (1 - tau_base) * sp.pi / (2 * K) * sp.sin(sp.pi * k / K)) == 0
    # sin(pi k / K) > 0 for 0 < k < K and 1 - tau_base > 0: strictly increasing, flat only at the ends
    assert slope.subs(k, 0) == 0 and sp.simplify(slope.subs(k, K)) == 0
    u = sp.Symbol("u", positive=True)  # k = u K with 0 < u < 1
    assert sp.simplify(slope.subs(k, u * K) * K / (sp.pi * (1 - tau_base) / 2) - sp.sin(sp.pi * u)) == 0


def test_the_package_schedule_is_the_formula():
    f = sp.lambdify((k, K, tau_base), TAU)
    for step, total, base in ((0, 100, 0.99), (37, 100, 0.99), (100, 100, 0.99), (5, 8, 0.996), (3, 10, 0.9)):
        assert cosine_momentum(step, total, base) == pytest.approx(f(step, total, base), abs=1e-15)


# ----------------------------------------------------------------------------------------------------------
# 3. SimSiam as alternating optimisation: the best target is the mean over augmentations
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


# ----------------------------------------------------------------------------------------------------------
# 4. The output std: 1/sqrt(d) on the sphere, 0 when collapsed
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


# ----------------------------------------------------------------------------------------------------------
# 5. The effective rank: what the output std cannot see
# ----------------------------------------------------------------------------------------------------------


def test_effective_rank_is_exp_of_the_entropy_of_the_normalised_singular_values():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    s = torch.linalg.svdvals(z / z.norm(dim=1, keepdim=True))
    p = s / s.sum()
    assert effective_rank(z).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
    # equal singular values give exactly the dimension: rows of a scaled identity
    assert effective_rank(3 * torch.eye(7)).item() == pytest.approx(7, rel=1e-6)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_a_rotated_k_dimensional_collapse_has_effective_rank_k_but_output_std_near_one_over_sqrt_d(k):
    d, n = 128, 20_000
    gen = torch.Generator().manual_seed(k)
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    z = torch.randn(n, k, generator=gen, dtype=torch.float64) @ basis.T
    assert effective_rank(z).item() == pytest.approx(k, rel=0.02)
    if k > 1:  # the std sees almost nothing: within 15% of the spread value
        assert output_std(z).item() * math.sqrt(d) > 0.85
    spread = torch.randn(n, d, generator=gen, dtype=torch.float64)
    assert effective_rank(spread).item() > 0.95 * d


def test_effective_rank_of_complete_collapse_is_one_and_bad_shapes_are_refused():
    direction = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    lengths = torch.rand(200, 1, generator=torch.Generator().manual_seed(1)) + 0.1
    assert effective_rank(direction * lengths).item() == pytest.approx(1, abs=1e-5)
    for bad in (torch.zeros(0, 4), torch.zeros(5)):
        with pytest.raises(ValueError, match="non-empty"):
            effective_rank(bad)


# ----------------------------------------------------------------------------------------------------------
# 6. The negative cosine turns q and never changes its length; the predictor estimates the mean
# ----------------------------------------------------------------------------------------------------------


def test_the_negative_cosine_gradient_is_the_closed_form_and_orthogonal_to_q():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(negative_cosine(q, z) * len(q), q)
    q_hat, z_hat = q.detach() / q.detach().norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    cos = (q_hat * z_hat).sum(1, keepdim=True)
    assert torch.allclose(grad, -(z_hat - cos * q_hat) / q.detach().norm(dim=1, keepdim=True), atol=1e-12)
    assert (grad * q.detach()).sum(1).abs().max() < 1e-12
    # without the cos * q_hat term the gradient would have a radial part
    assert ((-z_hat / q.detach().norm(dim=1, keepdim=True)) * q.detach()).sum(1).abs().max() > 0.01


def test_the_least_squares_predictor_of_one_view_from_the_other_is_the_conditional_mean():
    s_x, s_e, w = sp.symbols("sigma_x sigma_e w", positive=True)
    risk = w**2 * (s_x**2 + s_e**2) - 2 * w * s_x**2 + s_x**2 + s_e**2  # E (w z1 - z2)^2, z_i = x + e_i
    w_star = sp.solve(sp.diff(risk, w), w)[0]
    assert sp.simplify(w_star - s_x**2 / (s_x**2 + s_e**2)) == 0
    gen = torch.Generator().manual_seed(0)
    m, dim, sx, se = 50_000, 8, 1.0, 0.75
    x = sx * torch.randn(m, dim, generator=gen, dtype=torch.float64)
    v1, v2 = (x + se * torch.randn(m, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    slope = torch.linalg.lstsq(v1, v2).solution
    expected = sx**2 / (sx**2 + se**2)
    assert torch.allclose(slope, expected * torch.eye(dim, dtype=torch.float64), atol=0.01)
    # the prediction is closer to eta_x = x than one sample of the other view
    assert (v1 @ slope - x).pow(2).sum(1).mean() < 0.7 * (v1 - x).pow(2).sum(1).mean()
