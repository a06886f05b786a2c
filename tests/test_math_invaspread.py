"""The InvaSpread chapter: the spreading term's first-order form, its push, and the pinned loss."""

import math

import sympy as sp
import torch
import torch.nn.functional as F

from contrastive.losses import invaspread_loss
from contrastive.methods import build_method

# ----------------------------------------------------------------------------------------------------------
# 1. A column of probabilities: what sums to one, and the first-order spreading term
# ----------------------------------------------------------------------------------------------------------


def test_the_probabilities_of_a_column_sum_to_one_and_those_of_a_row_do_not():
    a = sp.symbols("a11 a12 a13 a22 a23 a33", real=True)
    s = sp.Matrix([[a[0], a[1], a[2]], [a[1], a[3], a[4]], [a[2], a[4], a[5]]])  # S = F F^T / tau
    p = [[sp.exp(s[i, c]) / sum(sp.exp(s[k, c]) for k in range(3)) for c in range(3)] for i in range(3)]
    for c in range(3):
        assert sp.simplify(sum(p[i][c] for i in range(3)) - 1) == 0
        assert sp.simplify(sum(p[i][c] for i in range(3) if i != c) - (1 - p[c][c])) == 0
    assert sp.simplify(sum(p[0][c] for c in range(3)) - 1) != 0  # the other axis


def test_the_first_order_spreading_term_is_a_reciprocal_partition_function_not_its_log():
    tau, log_z = sp.Symbol("tau", positive=True), sp.Symbol("L", real=True)
    p_self = sp.exp(1 / tau - log_z)  # P(j | x_j) = e^(1/tau) / Z_j
    assert sp.simplify(sp.diff(1 - p_self, log_z) - p_self) == 0  # weight P_j on log Z_j
    assert sp.simplify(sp.diff(-sp.log(p_self), log_z) - p_self) != 0  # the log form weighs it with 1
    # Numerically: a column with P_j = 1/2 and 200 negatives of small probability.
    gen = torch.Generator().manual_seed(0)
    shares = torch.rand(200, generator=gen, dtype=torch.float64)
    p_neg = 0.5 * shares / shares.sum()
    spreading = -torch.log1p(-p_neg).sum().item()
    first_order = 1 - 0.5  # 1 - P_j
    second = (p_neg**2).sum().item()
    assert first_order <= spreading <= first_order + second  # -log(1 - p) - p <= p^2 for p <= 1/2
    assert abs((spreading - first_order) / second - 0.5) < 0.01  # the second-order term, sum p^2 / 2
    assert abs(-math.log(0.5) - spreading) > 100 * second  # -log P_j is not the term to any order here


# ----------------------------------------------------------------------------------------------------------
# 2. The push of the spreading term on a negative
# ----------------------------------------------------------------------------------------------------------


def test_a_spreading_term_pushes_its_own_logit_with_weight_p_not_p_over_one_minus_p():
    s = sp.symbols("s1:5", real=True)
    z = sum(sp.exp(t) for t in s)
    p = [sp.exp(t) / z for t in s]
    for i in range(1, 4):
        push = sp.diff(-sp.log(1 - p[i]), s[i])
        assert sp.simplify(push - p[i]) == 0
        assert sp.simplify(push - p[i] / (1 - p[i])) != 0
    # summed over the column j = 0: P_m (1 - sum_{i != j, m} P_i / (1 - P_i)) on a negative m
    spreading = sum(-sp.log(1 - p[i]) for i in range(1, 4))
    for m in range(1, 4):
        others = sum(p[i] / (1 - p[i]) for i in range(1, 4) if i != m)
        assert sp.simplify(sp.diff(spreading, s[m]) - p[m] * (1 - others)) == 0
        assert sp.simplify(sp.diff(spreading, s[m]) - p[m] / (1 - p[m])) != 0


def test_to_first_order_the_push_on_a_negative_is_p_self_times_p_negative():
    n, a, b = sp.symbols("n A B", positive=True)
    sj, sm, so = sp.symbols("s_j s_m s_o", real=True)
    z = sp.exp(sj) + sp.exp(sm) + n * sp.exp(so)  # n other negatives of equal logit
    pj, pm, po = sp.exp(sj) / z, sp.exp(sm) / z, sp.exp(so) / z
    push = sp.diff(-sp.log(1 - pm) - n * sp.log(1 - po), sm)
    at = {sj: 0, sm: sp.log(b / n), so: sp.log(a / n)}  # every negative's P of order 1/n, P_j -> 1/(1 + A)

    def ratio(weight):
        return sp.limit(sp.simplify((push / weight).subs(at)), n, sp.oo)

    assert ratio(pj * pm) == 1
    assert sp.simplify(ratio(pm) - 1 / (1 + a)) == 0  # the cross-entropy weight P_m
    assert sp.simplify(ratio(pm / (1 - pm)) - 1 / (1 + a)) == 0


def test_the_push_in_a_wide_column_matches_p_self_times_p_negative_by_autograd():
    # 257 negatives sharing half of the column's mass, P_j = 1/2: relative error of order max P_i / P_j.
    gen = torch.Generator().manual_seed(1)
    logits = torch.cat([torch.tensor([0.0], dtype=torch.float64), torch.rand(257, generator=gen).double()])
    logits[1:] -= torch.logsumexp(logits[1:], 0)  # the negatives carry as much mass as the image itself
    logits.requires_grad_(True)
    p = logits.softmax(0)
    (grad,) = torch.autograd.grad(-torch.log1p(-p[1:]).sum(), logits)
    p = p.detach()
    assert abs(p[0].item() - 0.5) < 1e-12
    push = grad[1:]
    assert (push / (p[0] * p[1:]) - 1).abs().max() < 4 * p[1:].max() / p[0]
    assert (push / p[1:] - 1).abs().min() > 0.4  # the cross-entropy weight P_m, off by the factor P_j
    assert (push / (p[1:] / (1 - p[1:])) - 1).abs().min() > 0.4
    assert (push <= p[1:] * (p[0] + p[1:])).all()  # at most P_m (P_j + P_m)


# ----------------------------------------------------------------------------------------------------------
# 3. The package's loss pinned: value and gradient against the chapter's formulas
# ----------------------------------------------------------------------------------------------------------


def loops(f, f_hat, tau, variant="definition"):
    """J / N with loops, on unit rows: -sum_i log P(i | x^_i) - sum_i sum_{j != i} log(1 - P(i | x_j)).

    variant="spreading on the copies" reads the second term's columns at x^_j instead of x_j, and
    "no spreading" drops the second term: wrong variants, kept to show that they are rejected.
    """
    n = len(f)

    def prob(i, v):
        return torch.exp(f[i] @ v / tau) / sum(torch.exp(f[k] @ v / tau) for k in range(n))

    total = -sum(torch.log(prob(i, f_hat[i])) for i in range(n))
    queries = f_hat if variant == "spreading on the copies" else f
    if variant != "no spreading":
        total = total - sum(torch.log(1 - prob(i, queries[j])) for i in range(n) for j in range(n) if j != i)
    return total / n


def closed_form_gradients(f, f_hat, tau, variant="theorem"):
    """dJ/N over unit f and f^, from the theorem's logit gradients chained through S and S^."""
    n = len(f)
    p_hat, p = (f @ f_hat.T / tau).softmax(0), (f @ f.T / tau).softmax(0)  # [m, j]: P(m | column j)
    eye = torch.eye(n, dtype=f.dtype)
    g_hat = p_hat - eye
    ratio = (p / (1 - p)).masked_fill(eye.bool(), 0.0)
    g = ratio if variant == "push P/(1-P)" else ratio - p * ratio.sum(0)
    transposed = 0 if variant == "no transpose" else g.T @ f
    d_f = (g_hat @ f_hat + g @ f + transposed) / (tau * n)
    d_f_hat = g_hat.T @ f / (tau * n)
    return tuple(v - (v * x).sum(1, keepdim=True) * x for x, v in ((f, d_f), (f_hat, d_f_hat)))


def test_package_loss_and_gradient_are_the_loop_formula_and_the_theorems_closed_form():
    gen = torch.Generator().manual_seed(2)
    n, tau = 5, 0.2
    f, f_hat = (F.normalize(torch.randn(n, 4, generator=gen, dtype=torch.float64), dim=1) for _ in range(2))
    leaves = f.clone().requires_grad_(True), f_hat.clone().requires_grad_(True)
    loss = invaspread_loss(*leaves, tau)
    grads = torch.autograd.grad(loss, leaves)
    reference = loops(*(x.clone().requires_grad_(True) for x in (f, f_hat)), tau)
    assert abs(loss.item() - reference.item()) < 1e-12
    # autograd through the loops, projected onto the sphere (the package normalises its inputs)
    loop_leaves = f.clone().requires_grad_(True), f_hat.clone().requires_grad_(True)
    loop_grads = torch.autograd.grad(loops(*(F.normalize(x, dim=1) for x in loop_leaves), tau), loop_leaves)
    for ours, theirs, theory in zip(grads, loop_grads, closed_form_gradients(f, f_hat, tau)):
        assert torch.allclose(ours, theirs, atol=1e-12) and torch.allclose(ours, theory, atol=1e-12)
    for variant in ("no transpose", "push P/(1-P)"):
        wrong = closed_form_gradients(f, f_hat, tau, variant)
        assert max((a - b).abs().max().item() for a, b in zip(grads, wrong)) > 1e-3, variant
    for variant in ("spreading on the copies", "no spreading"):
        assert abs(loss.item() - loops(f, f_hat, tau, variant).item()) > 1e-2, variant


def test_the_half_bound_holds_for_the_images_and_not_for_the_augmented_copies():
    gen = torch.Generator().manual_seed(3)
    f = F.normalize(torch.randn(6, 5, generator=gen, dtype=torch.float64), dim=1)
    f_hat = F.normalize(f.roll(1, 0) + 0.05 * torch.randn(6, 5, generator=gen, dtype=torch.float64), dim=1)
    off = ~torch.eye(6, dtype=torch.bool)
    for tau in (0.05, 0.1, 1.0):
        assert (f @ f.T / tau).softmax(0)[off].max() <= 0.5
    assert (f @ f_hat.T / 0.1).softmax(0)[off].max() > 0.5  # x^_j lies next to another instance


# ----------------------------------------------------------------------------------------------------------
# 4. The chapter's run check: P(i | x^_i) above chance
# ----------------------------------------------------------------------------------------------------------


def test_a_collapsed_encoder_logs_exactly_chance_so_the_above_chance_check_rejects_it():
    method = build_method("invaspread", "convnet_tiny", num_images=10)
    batch = 16
    same = torch.ones(batch, 128)
    method.log_positive_probability(same, same)
    collapsed = method.epoch_metrics()["positive_probability"]
    gen = torch.Generator().manual_seed(4)
    f = torch.randn(batch, 128, generator=gen)
    method.log_positive_probability(f, f + 0.01 * torch.randn(batch, 128, generator=gen))
    discriminating = method.epoch_metrics()["positive_probability"]
    assert abs(collapsed - 1 / batch) < 1e-6
    assert not collapsed > 1 / batch + 1e-6  # the chapter's assertion fails for it
    assert discriminating > 1 / batch
