"""CPC's bound, I(x; c) >= log N - L_N, and the variational bounds family on a bivariate Gaussian where the
mutual information is exact. Every check is paired with a named wrong variant that it must reject.

Monte Carlo tolerances are K = 4 standard errors."""

import math

import pytest
import sympy as sp
import torch

from contrastive.losses import info_nce
from contrastive.methods.cpc import own_target_excluded

K = 4  # Monte Carlo tolerance, in standard errors


# ---------------------------------------------------------------------------------------------------------
# Symbolic: the Gaussian pair, its density ratio and the closed forms the estimators' spreads rest on
# ---------------------------------------------------------------------------------------------------------

X, C = sp.symbols("x c", real=True)
RHO = sp.Symbol("rho", positive=True)
JOINT = sp.exp(-(X**2 - 2 * RHO * X * C + C**2) / (2 * (1 - RHO**2))) / (2 * sp.pi * sp.sqrt(1 - RHO**2))
MI = -sp.log(1 - RHO**2) / 2


def normal(u, mean, var):
    return sp.exp(-((u - mean) ** 2) / (2 * var)) / sp.sqrt(2 * sp.pi * var)


def same_density(p, q):
    return sp.simplify(sp.expand_log(sp.log(p / q), force=True)) == 0


def log_ratio_symbolic():
    """log p(x|c)/p(x), expanded."""
    return sp.expand(sp.expand_log(sp.log(JOINT / normal(C, 0, 1) / normal(X, 0, 1)), force=True))


def expect(expr, xc_moment):
    """E of a polynomial of degree <= 2 in (x, c) with unit variances and E[xc] = xc_moment."""
    moments = {(0, 0): 1, (2, 0): 1, (0, 2): 1, (1, 1): xc_moment, (1, 0): 0, (0, 1): 0}
    return sp.simplify(sum(coeff * moments[e] for e, coeff in sp.Poly(expr, X, C).terms()))


def test_the_conditional_is_normal_with_mean_rho_c_and_variance_one_minus_rho_squared():
    conditional = JOINT / normal(C, 0, 1)
    assert same_density(conditional, normal(X, RHO * C, 1 - RHO**2))
    assert not same_density(conditional, normal(X, C, 1 - RHO**2))  # control: mean c
    assert not same_density(conditional, normal(X, RHO * C, 1))  # control: the marginal's variance


def test_mutual_information_of_a_bivariate_gaussian_is_minus_half_log_one_minus_rho_squared():
    assert sp.simplify(expect(log_ratio_symbolic(), RHO) - MI) == 0
    # Control: the moments of an independent pair give E_{p(x)p(c)} log r = -KL(p(x)p(c) || p(x, c)), not I.
    assert sp.simplify(expect(log_ratio_symbolic(), 0) - MI) != 0
    assert sp.simplify(MI - (-sp.log(1 - RHO) / 2)) != 0  # a wrong closed form is rejected


def gaussian_integral(log_f, variables):
    """int exp(log_f) over R^k for a quadratic log_f with no linear term and a negative definite Hessian."""
    log_f = sp.expand(sp.expand_log(log_f, force=True))
    a = -sp.hessian(log_f, variables)
    at_zero = {v: 0 for v in variables}
    assert all(sp.simplify(sp.diff(log_f, v).subs(at_zero)) == 0 for v in variables)
    for k in range(1, len(variables) + 1):
        minor = sp.factor(a[:k, :k].det())
        assert all(minor.subs(RHO, sp.Rational(j, 20)) > 0 for j in range(1, 20)), minor
    k = len(variables)
    return sp.exp(log_f.subs(at_zero)) * (2 * sp.pi) ** sp.Rational(k, 2) / sp.sqrt(sp.factor(a.det()))


def log_p(u, v):
    return sp.log(JOINT.subs({X: u, C: v}, simultaneous=True))


def log_m(u, v):
    return sp.log(normal(u, 0, 1) * normal(v, 0, 1))


def log_rr(u, v):
    return log_p(u, v) - log_m(u, v)


def same_positive(u, v):
    """u == v for two positive expressions, by their squares (sympy does not know that rho < 1)."""
    return sp.simplify(u**2 - v**2) == 0


def test_the_closed_forms_behind_the_spread_of_the_estimators():
    x1, c1, x2, c2 = sp.symbols("x_1 c_1 x_2 c_2", real=True)
    mean_r = gaussian_integral(log_m(x1, c1) + log_rr(x1, c1), [x1, c1])
    mean_r2 = gaussian_integral(log_m(x1, c1) + 2 * log_rr(x1, c1), [x1, c1])
    kappa = gaussian_integral(
        log_p(x1, c1) + log_p(x2, c2) + log_rr(x2, c1) + log_rr(x1, c2), [x1, c1, x2, c2]
    )
    assert same_positive(mean_r, 1)
    assert same_positive(mean_r2, sp.exp(2 * MI))
    assert same_positive(kappa, 1 / (1 - RHO**4))
    assert not same_positive(kappa, mean_r2)  # control: the transposed pair as an independent draw
    assert not same_positive(mean_r2, sp.exp(MI))  # control: e^I instead of e^{2I}


def test_the_variance_of_log_r_under_the_joint_is_rho_squared():
    e = sp.Symbol("e", real=True)
    on_joint = sp.expand(log_ratio_symbolic().subs(X, RHO * C + sp.sqrt(1 - RHO**2) * e))

    def moment(k):
        return 0 if k % 2 else sp.factorial2(k - 1)

    def expect_joint(f):
        return sum(co * moment(i) * moment(j) for (i, j), co in sp.Poly(sp.expand(f), C, e).terms())

    var = sp.simplify(expect_joint(on_joint**2) - expect_joint(on_joint) ** 2)
    assert sp.simplify(var - RHO**2) == 0
    assert sp.simplify(var - (1 - RHO**2)) != 0  # control: the conditional variance


def test_each_variational_bound_is_tight_at_its_optimal_critic_and_the_wrong_constants_are_not():
    info, a = sp.symbols("I a", real=True)

    def nwj(shift):  # E_p f - e^{-1} E_m e^f with f = shift + log r, E_p log r = I, E_m r = 1
        return info + shift - sp.exp(shift - 1)

    def dv(shift):  # E_p f - log E_m e^f
        return info + shift - sp.log(sp.exp(shift))

    assert sp.simplify(nwj(1) - info) == 0 and sp.solve(sp.diff(nwj(a), a), a) == [1]
    assert sp.simplify(dv(a) - info) == 0
    assert sp.simplify(nwj(0) - info) != 0  # control: NWJ with f = log r loses 1/e

    def ba(q):  # E_p log q(x|c) + H(x)
        return sp.simplify(
            expect(sp.expand(sp.expand_log(sp.log(q), force=True)), RHO) + sp.log(2 * sp.pi * sp.E) / 2
        )

    assert sp.simplify(ba(normal(X, RHO * C, 1 - RHO**2)) - MI) == 0
    q_wrong = sp.exp(-((X - RHO * C) ** 2) / (2 * (1 - RHO**2))) / (sp.sqrt(2 * sp.pi) * (1 - RHO**2))
    assert sp.simplify(ba(q_wrong) - 2 * MI) == 0  # control: a q that integrates to more than one


# ---------------------------------------------------------------------------------------------------------
# Monte Carlo: the InfoNCE bound with the optimal critic
# ---------------------------------------------------------------------------------------------------------


def log_r(x, c, rho):
    return -0.5 * math.log(1 - rho**2) - (x - rho * c) ** 2 / (2 * (1 - rho**2)) + x**2 / 2


def infonce_terms(rho: float, n: int, contexts: int = 4000, seed: int = 0):
    """Per context, f = r: the summand of log N - L_N and the proof's log (1/N) sum_j r(x_j, c); then the
    same two with the positive left out of the sum (a wrong variant)."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(contexts, generator=gen, dtype=torch.float64)
    x_pos = rho * c + math.sqrt(1 - rho**2) * torch.randn(contexts, generator=gen, dtype=torch.float64)
    x = torch.cat([x_pos[:, None], torch.randn(contexts, n - 1, generator=gen, dtype=torch.float64)], 1)
    scores = log_r(x, c[:, None], rho)
    kl = torch.logsumexp(scores, 1) - math.log(n)
    kl_wrong = torch.logsumexp(scores[:, 1:], 1) - math.log(n - 1)
    return scores[:, 0] - kl, kl, scores[:, 0] - kl_wrong, kl_wrong


def mean_se(t):
    return t.mean().item(), t.std().item() / math.sqrt(len(t))


def test_the_infonce_bound_holds_and_never_exceeds_log_n_and_leaving_out_the_positive_breaks_both():
    above_i = above_log_n = 0
    for rho in (0.5, 0.9, 0.99):
        true_mi = -0.5 * math.log(1 - rho**2)
        for n in (2, 16, 256):
            bound, _, wrong, _ = infonce_terms(rho, n)
            b, se = mean_se(bound)
            assert b <= true_mi + K * se, (rho, n, b, true_mi)
            assert (bound <= math.log(n) + 1e-12).all()
            w, w_se = mean_se(wrong)
            above_i += w > true_mi + K * w_se
            above_log_n += bool((wrong > math.log(n) + 1e-12).any())
    assert above_i > 0 and above_log_n > 0  # control: the positive left out of the denominator


def test_the_kl_term_of_the_proof_is_non_negative_and_vanishes_for_independent_views():
    """E log (1/N) sum_j r(x_j, c) is a KL divergence: >= 0, and 0 when x and c are independent (r = 1)."""
    for rho in (0.5, 0.9, 0.99):
        for n in (2, 16):
            _, kl, _, _ = infonce_terms(rho, n, seed=3)
            k, se = mean_se(kl)
            assert k >= -K * se
            if rho >= 0.9:
                assert k > K * se  # and clearly positive once the views are strongly dependent
        # Control: without the positive, E log r(x_2, c) = -KL(p(x)p(c) || p(x, c)) < 0.
        _, _, _, kl_wrong = infonce_terms(rho, 2, seed=3)
        kw, kw_se = mean_se(kl_wrong)
        assert kw < -K * kw_se
    _, kl, _, _ = infonce_terms(1e-12, 16, seed=3)
    assert kl.abs().max() < 1e-9


def test_the_bound_tightens_as_n_grows_and_the_variant_without_the_positive_does_not():
    terms = [infonce_terms(0.9, n) for n in (2, 16, 256)]
    bounds = [t[0] for t in terms]  # the same contexts and positives for every N: compare them pairwise
    for lo, hi in zip(bounds, bounds[1:]):
        gain, se = mean_se(hi - lo)
        assert gain > K * se
    assert mean_se(bounds[-1])[0] < -0.5 * math.log(1 - 0.81) + K * mean_se(bounds[-1])[1]
    wrong = [mean_se(t[2])[0] for t in terms]
    assert not (wrong[0] < wrong[1] < wrong[2])  # control: an upper bound comes down towards I as N grows


def pooled_batch(rho, m, num_negatives, sampler, gen):
    """m pairs; each query c_i scored, f = r, against x_i and num_negatives draws from {x_1..x_m}."""
    c = torch.randn(m, generator=gen, dtype=torch.float64)
    x = rho * c + math.sqrt(1 - rho**2) * torch.randn(m, generator=gen, dtype=torch.float64)
    if sampler == "package":
        drawn = torch.randperm(m, generator=gen)[: num_negatives + 1]
        exclude = own_target_excluded(drawn, torch.arange(m), num_negatives)
    else:  # with replacement from the whole pool, own x_i included
        drawn = torch.randint(0, m, (num_negatives,), generator=gen)
        exclude = torch.zeros(m, num_negatives, dtype=torch.bool)
    positive = log_r(x, c, rho)
    negatives = log_r(x[drawn][None, :], c[:, None], rho).masked_fill(exclude, -math.inf)
    loss = torch.cat([positive[:, None], negatives], 1).logsumexp(1) - positive
    copies = ((drawn[None, :] == torch.arange(m)[:, None]) & ~exclude).sum(1)
    top1 = (positive > negatives.max(1).values).double()
    return loss, top1, copies


def test_the_bound_reaches_log_n_only_when_no_negative_is_the_positive():
    """I >> log N: with independent negatives log N - L_N -> log N and top-1 -> 1. A sampler that can draw
    the positive stops at log N - E log(1 + K), K ~ Binomial(N - 1, 1/M), and at top-1 1 - q."""
    m, neg, rho = 512, 256, math.sqrt(-math.expm1(-2 * 13.5))
    gen = torch.Generator().manual_seed(0)
    q = 1 - (1 - 1 / m) ** neg
    floor = sum(
        math.comb(neg, k) * (1 / m) ** k * (1 - 1 / m) ** (neg - k) * math.log1p(k) for k in range(neg + 1)
    )
    results = {}
    for sampler in ("package", "with replacement"):
        loss, top1, copies = (
            torch.cat(t) for t in zip(*(pooled_batch(rho, m, neg, sampler, gen) for _ in range(8)))
        )
        assert (loss >= torch.log1p(copies.double()) - 1e-12).all()  # the floor log(1 + K), for any critic
        results[sampler] = (loss.mean().item(), top1.mean().item(), (copies > 0).double().mean().item())
    loss_ok, top1_ok, hit_ok = results["package"]
    loss_bad, top1_bad, hit_bad = results["with replacement"]
    assert hit_ok == 0 and loss_ok < 0.01 and top1_ok > 0.99
    assert not (loss_bad < 0.01 or top1_bad > 0.99)  # control
    se = math.sqrt(q * (1 - q) / (8 * m))
    assert abs(hit_bad - q) < K * se and top1_bad <= 1 - hit_bad and abs(top1_bad - (1 - q)) < K * se
    assert abs(loss_bad - floor) < 0.01


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

    def feats(u):
        return torch.stack([u, u**2], dim=-1)

    loss = info_nce(query, feats(x_pos), feats(x_neg), temperature=1.0)
    log_f = torch.cat([(query * feats(x_pos)).sum(1, keepdim=True), query @ feats(x_neg).T], dim=1)
    direct = -(log_f[:, 0] - torch.logsumexp(log_f, dim=1)).mean()
    assert torch.allclose(loss.double(), direct, atol=1e-5)
    without_positive = -(log_f[:, 0] - torch.logsumexp(log_f[:, 1:], dim=1)).mean()
    assert not torch.allclose(loss.double(), without_positive, atol=1e-3)  # control


# ---------------------------------------------------------------------------------------------------------
# info_nce pinned: value and gradients against the loss written out one candidate at a time
# ---------------------------------------------------------------------------------------------------------


def info_nce_by_loops(q, k, negatives, tau, exclude, positive_in_sum=True, tau_divides=True):
    n, d = q.shape
    t = tau if tau_divides else 1.0
    loss, g_q, g_k, g_neg = 0.0, torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(negatives)
    for i in range(n):
        s_pos = sum(q[i, a] * k[i, a] for a in range(d)) / t
        kept = [j for j in range(len(negatives)) if not exclude[i, j]]
        s_neg = {j: sum(q[i, a] * negatives[j, a] for a in range(d)) / t for j in kept}
        z = (math.exp(s_pos) if positive_in_sum else 0.0) + sum(math.exp(s) for s in s_neg.values())
        loss += (math.log(z) - s_pos) / n
        p_pos = math.exp(s_pos) / z if positive_in_sum else 0.0
        g_q[i] += (p_pos - 1) * k[i] / (n * t)
        g_k[i] += (p_pos - 1) * q[i] / (n * t)
        for j, s in s_neg.items():
            g_q[i] += math.exp(s) / z * negatives[j] / (n * t)
            g_neg[j] += math.exp(s) / z * q[i] / (n * t)
    return loss, (g_q, g_k, g_neg)


def test_info_nce_value_and_gradients_match_the_loops_and_four_wrong_variants_do_not():
    gen = torch.Generator().manual_seed(0)
    q, k, negs = (0.5 * torch.randn(m, 3, generator=gen, dtype=torch.float64) for m in (4, 4, 6))
    exclude = torch.zeros(4, 6, dtype=torch.bool)
    exclude[0, 1] = exclude[2, 4] = exclude[2, 5] = True
    tau = 0.3
    inputs = [t.clone().requires_grad_(True) for t in (q, k, negs)]
    value = info_nce(*inputs, tau, exclude=exclude)
    grads = torch.autograd.grad(value, inputs)

    def close(ref):
        ref_value, ref_grads = ref
        return abs(value.item() - ref_value) < 1e-5 and all(
            torch.allclose(a.double(), b, atol=1e-5) for a, b in zip(grads, ref_grads)
        )

    assert close(info_nce_by_loops(q, k, negs, tau, exclude))
    assert not close(info_nce_by_loops(q, k, negs, tau, exclude, positive_in_sum=False))
    assert not close(info_nce_by_loops(q, k, negs, tau, torch.zeros_like(exclude)))
    assert not close(info_nce_by_loops(q, k, negs, tau, exclude, tau_divides=False))
    assert not close(info_nce_by_loops(k, q, negs, tau, exclude))  # negatives scored against the positive


# ---------------------------------------------------------------------------------------------------------
# Monte Carlo: the variational bounds family at the optimal critics
# ---------------------------------------------------------------------------------------------------------


def variational_bounds(info, n, reps, gen):
    rho = math.sqrt(-math.expm1(-2 * info))
    c = torch.randn(reps, n, generator=gen, dtype=torch.float64)
    x = rho * c + math.exp(-info) * torch.randn(reps, n, generator=gen, dtype=torch.float64)
    scores = log_r(x[:, None, :], c[:, :, None], rho)  # [batch, i, j] = log r(x_j, c_i)
    pos = scores.diagonal(dim1=1, dim2=2)
    mask = torch.eye(n, dtype=torch.bool)
    log_mean_r = scores[:, ~mask].logsumexp(1) - math.log(n * (n - 1))
    return {
        "BA": pos.mean(1),
        "DV": pos.mean(1) - log_mean_r,
        "NWJ": 1 + pos.mean(1) - log_mean_r.exp(),
        "InfoNCE": math.log(n) + (pos - scores.logsumexp(2)).mean(1),
        "BA wrong normaliser": 2 * pos.mean(1),
        "NWJ f = log r": pos.mean(1) - log_mean_r.exp() / math.e,
        "InfoNCE without positive": math.log(n - 1)
        + (pos - scores.masked_fill(mask, -math.inf).logsumexp(2)).mean(1),
    }


def exact_sd(name, info, n):
    rho2 = -math.expm1(-2 * info)
    var = rho2 / n
    if name == "NWJ":
        var += (math.exp(2 * info) + 1 / (1 - rho2**2) - 2) / (n * (n - 1))
    return math.sqrt(var)


@pytest.mark.parametrize("n,reps", [(16, 1000), (64, 200)])
def test_the_variational_bounds_at_their_optimal_critics_and_their_controls(n, reps):
    gen = torch.Generator().manual_seed(n)
    rejected = {"BA wrong normaliser": 0, "NWJ f = log r": 0, "InfoNCE without positive": 0}
    for info in (0.5, 2.0, 4.0, 6.0):
        est = variational_bounds(info, n, reps, gen)
        se = {name: v.std().item() / math.sqrt(reps) for name, v in est.items()}
        exact_se = {name: exact_sd(name, info, n) / math.sqrt(reps) for name in ("BA", "NWJ")}
        mean = {name: v.mean().item() for name, v in est.items()}
        assert abs(mean["BA"] - info) <= K * exact_se["BA"]
        assert abs(mean["NWJ"] - info) <= K * exact_se["NWJ"]
        assert mean["InfoNCE"] <= info + K * se["InfoNCE"]
        assert (est["InfoNCE"] <= math.log(n) + 1e-12).all()
        rejected["BA wrong normaliser"] += mean["BA wrong normaliser"] > info + K * exact_se["BA"]
        rejected["NWJ f = log r"] += abs(mean["NWJ f = log r"] - info) > K * exact_se["NWJ"]
        wrong = est["InfoNCE without positive"]
        rejected["InfoNCE without positive"] += bool(
            wrong.mean() > info + K * se["InfoNCE without positive"] or (wrong > math.log(n) + 1e-12).any()
        )
        if n == 16 and info >= 4:  # DV: the log of a sample mean, biased upwards past I; NWJ is not
            assert mean["DV"] > info + K * se["DV"]
            assert not mean["NWJ"] > info + K * exact_se["NWJ"]
    assert all(count > 0 for count in rejected.values()), rejected


def test_the_exact_variance_of_the_nwj_estimate_matches_a_light_tailed_monte_carlo():
    """At rho = 0.1 every moment the check needs is finite (E_m r^k < inf iff rho < 1/(k - 1))."""
    n, reps, rho = 4, 200_000, 0.1
    info = -0.5 * math.log(1 - rho**2)
    nwj = variational_bounds(info, n, reps, torch.Generator().manual_seed(0))["NWJ"]
    centred = nwj - nwj.mean()
    var = centred.pow(2).mean().item()
    se = math.sqrt((centred.pow(4).mean().item() - var**2) / reps)
    assert abs(var - exact_sd("NWJ", info, n) ** 2) < K * se
    assert abs(var - exact_sd("BA", info, n) ** 2) > K * se  # control: the off-diagonal term left out
