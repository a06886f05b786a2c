"""CPC's bound, I(x; c) >= log N - L_N, on a bivariate Gaussian where the mutual information is exact."""

import math

import sympy as sp
import torch

from contrastive.losses import info_nce


def gaussian_log_ratio_and_mi():
    """log p(x|c)/p(x) and its expectation for standard normals with correlation rho, symbolically."""
    x, c = sp.symbols("x c", real=True)
    rho = sp.Symbol("rho", positive=True)
    joint = sp.exp(-(x**2 - 2 * rho * x * c + c**2) / (2 * (1 - rho**2))) / (2 * sp.pi * sp.sqrt(1 - rho**2))
    marginal = lambda u: sp.exp(-(u**2) / 2) / sp.sqrt(2 * sp.pi)  # noqa: E731
    conditional = joint / marginal(c)
    log_ratio = sp.expand(sp.expand_log(sp.log(conditional / marginal(x)), force=True))
    # E over the joint: replace the monomials by the Gaussian moments E[x^2] = E[c^2] = 1, E[xc] = rho.
    poly = sp.Poly(log_ratio, x, c)
    moments = {(0, 0): 1, (2, 0): 1, (0, 2): 1, (1, 1): rho, (1, 0): 0, (0, 1): 0}
    mi = sum(coeff * moments[exps] for exps, coeff in poly.terms())
    return x, c, rho, conditional, log_ratio, sp.simplify(mi)


def test_the_conditional_is_normal_with_mean_rho_c_and_variance_one_minus_rho_squared():
    x, c, rho, conditional, _, _ = gaussian_log_ratio_and_mi()
    expected = sp.exp(-((x - rho * c) ** 2) / (2 * (1 - rho**2))) / sp.sqrt(2 * sp.pi * (1 - rho**2))
    assert sp.simplify(sp.expand_log(sp.log(conditional / expected), force=True)) == 0
    wrong = sp.exp(-((x - c) ** 2) / (2 * (1 - rho**2))) / sp.sqrt(2 * sp.pi * (1 - rho**2))
    assert sp.simplify(sp.expand_log(sp.log(conditional / wrong), force=True)) != 0


def test_mutual_information_of_a_bivariate_gaussian_is_minus_half_log_one_minus_rho_squared():
    *_, rho, _, _, mi = gaussian_log_ratio_and_mi()
    assert sp.simplify(mi - (-sp.log(1 - rho**2) / 2)) == 0
    assert sp.simplify(mi - (-sp.log(1 - rho) / 2)) != 0  # a wrong closed form is rejected


def monte_carlo_bound(rho: float, n: int, contexts: int = 4000, seed: int = 0) -> float:
    """log N - L_N, optimal critic f = p(x|c)/p(x); per context one positive, N - 1 marginal negatives."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(contexts, generator=gen, dtype=torch.float64)
    x_pos = rho * c + math.sqrt(1 - rho**2) * torch.randn(contexts, generator=gen, dtype=torch.float64)
    x_neg = torch.randn(contexts, n - 1, generator=gen, dtype=torch.float64)
    x = torch.cat([x_pos[:, None], x_neg], dim=1)
    log_f = -((x - rho * c[:, None]) ** 2) / (2 * (1 - rho**2)) + x**2 / 2  # log ratio up to a constant
    loss = -(log_f[:, 0] - torch.logsumexp(log_f, dim=1)).mean()
    return math.log(n) - loss.item()


def test_the_infonce_bound_holds_and_never_exceeds_log_n():
    for rho in (0.5, 0.9, 0.99):
        true_mi = -0.5 * math.log(1 - rho**2)
        for n in (2, 16, 256):
            bound = monte_carlo_bound(rho, n)
            assert bound <= true_mi + 0.02, (rho, n, bound, true_mi)
            assert bound <= math.log(n) + 1e-12


def test_the_bound_saturates_at_log_n_when_the_views_are_nearly_identical():
    """As rho -> 1 the true MI grows without bound, but log N - L_N creeps up to log N and stops there."""
    gaps = [math.log(16) - monte_carlo_bound(1 - eps, 16) for eps in (1e-2, 1e-4, 1e-6, 1e-8)]
    assert all(a > b > 0 for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 0.02


def test_the_bound_tightens_as_n_grows():
    bounds = [monte_carlo_bound(0.9, n) for n in (2, 16, 256)]
    assert bounds[0] < bounds[1] < bounds[2] < -0.5 * math.log(1 - 0.81)


def test_info_nce_with_the_optimal_critic_equals_the_monte_carlo_loss():
    """The package's info_nce, fed the critic as dot products, reproduces L_N for shared negatives."""
    rho, n = 0.9, 16
    gen = torch.Generator().manual_seed(1)
    c = torch.randn(64, generator=gen, dtype=torch.float64)
    x_pos = rho * c + math.sqrt(1 - rho**2) * torch.randn(64, generator=gen, dtype=torch.float64)
    x_neg = torch.randn(n - 1, generator=gen, dtype=torch.float64)
    # log f(x, c) = a(c) x + b x^2 + const: write it as a dot product of (x, x^2) with (a(c), b).
    a, b = rho * c / (1 - rho**2), -1 / (2 * (1 - rho**2)) + 0.5
    query = torch.stack([a, torch.full_like(a, b)], dim=1)
    feats = lambda u: torch.stack([u, u**2], dim=-1)  # noqa: E731
    loss = info_nce(query, feats(x_pos), feats(x_neg), temperature=1.0)
    log_f = torch.cat([(query * feats(x_pos)).sum(1, keepdim=True), query @ feats(x_neg).T], dim=1)
    direct = -(log_f[:, 0] - torch.logsumexp(log_f, dim=1)).mean()
    assert torch.allclose(loss.double(), direct, atol=1e-6)


def test_the_kl_term_of_the_proof_is_non_negative_and_vanishes_for_independent_views():
    """E log (1/N) sum_j r(x_j, c) is a KL divergence: >= 0, and 0 when x and c are independent (r = 1)."""
    gen = torch.Generator().manual_seed(3)
    for rho in (0.0, 0.5, 0.9):
        c = torch.randn(4000, generator=gen, dtype=torch.float64)
        x_pos = rho * c + math.sqrt(1 - rho**2) * torch.randn(4000, generator=gen, dtype=torch.float64)
        x = torch.cat([x_pos[:, None], torch.randn(4000, 15, generator=gen, dtype=torch.float64)], 1)
        log_r = -0.5 * math.log(1 - rho**2) - (x - rho * c[:, None]) ** 2 / (2 * (1 - rho**2)) + x**2 / 2
        kl = (torch.logsumexp(log_r, 1) - math.log(16)).mean().item()
        if rho == 0.0:
            assert abs(kl) < 1e-12
        else:
            assert kl > 0.0
