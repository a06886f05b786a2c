"""The DINO chapter's statements: cross-entropy = entropy + KL, softmax's invariance to a shared shift
(so the center acts per output dimension), the one-hot limit of sharpening, and the center's running mean."""

import math

import pytest
import sympy as sp
import torch

from contrastive.losses import dino_loss
from contrastive.methods.dino import update_center

K = 3
p = sp.symbols("p1:4", positive=True)
q = sp.symbols("q1:4", positive=True)
x = sp.symbols("x1:4", real=True)


def _softmax(logits, temperature=1):
    exps = [sp.exp(v / temperature) for v in logits]
    return [e / sum(exps) for e in exps]


# ----------------------------------------------------------------------------------------------------------
# 1. H(P_t, P_s) = H(P_t) + KL(P_t || P_s)
# ----------------------------------------------------------------------------------------------------------


def test_cross_entropy_is_the_teachers_entropy_plus_the_kl_divergence():
    cross = -sum(p[i] * sp.log(q[i]) for i in range(K))
    entropy = -sum(p[i] * sp.log(p[i]) for i in range(K))
    kl = sum(p[i] * sp.log(p[i] / q[i]) for i in range(K))
    assert sp.simplify(sp.expand_log(cross - entropy - kl, force=True)) == 0
    # the student's distribution enters only the KL: minimising over P_s gives P_s = P_t (KL = 0)
    assert sp.simplify(kl.subs(dict(zip(q, p)))) == 0


def test_dino_loss_is_entropy_plus_kl_numerically():
    gen = torch.Generator().manual_seed(0)
    s, t, c = (torch.randn(6, 9, generator=gen, dtype=torch.float64) for _ in range(3))
    c = c[0]
    p_t = torch.softmax((t - c) / 0.04, 1)
    p_s = torch.softmax(s / 0.1, 1)
    entropy = -(p_t * p_t.log()).sum(1).mean()
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert torch.allclose(dino_loss(s, t, c, 0.1, 0.04), entropy + kl, rtol=0, atol=1e-10)
    assert kl > 0  # Gibbs' inequality, the student is not the teacher
    # a student that copies the teacher's distribution leaves only the entropy
    copy = torch.log(p_t) * 0.1  # softmax(copy / 0.1) = P_t
    assert torch.allclose(dino_loss(copy, t, c, 0.1, 0.04), entropy, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# 2. Softmax ignores a constant added to every logit; the center acts per output dimension
# ----------------------------------------------------------------------------------------------------------


def test_softmax_is_invariant_to_adding_one_constant_to_all_logits():
    a = sp.Symbol("a", real=True)
    shifted, plain = _softmax([v + a for v in x]), _softmax(x)
    assert all(sp.simplify(u - v) == 0 for u, v in zip(shifted, plain))
    # a shift of one logit alone is not a symmetry
    one = _softmax([x[0] + a, x[1], x[2]])
    assert sp.simplify(one[0] - plain[0]) != 0


def test_only_the_centers_deviation_from_its_own_mean_changes_the_teacher():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 4, generator=gen).double(), torch.randn(5, 4, generator=gen).double()
    c = torch.randn(4, generator=gen, dtype=torch.float64)
    base = dino_loss(s, t, c, 0.1, 0.04)
    # the same constant on every dimension of the center, or on every logit of a teacher row: no effect
    assert torch.allclose(dino_loss(s, t, c + 3.7, 0.1, 0.04), base, rtol=0, atol=1e-10)
    row_shift = torch.randn(5, 1, generator=gen, dtype=torch.float64)
    assert torch.allclose(dino_loss(s, t + row_shift, c, 0.1, 0.04), base, rtol=0, atol=1e-10)
    # a center that differs across dimensions moves the teacher: it acts per output dimension
    assert not torch.allclose(dino_loss(s, t, c * torch.tensor([1.0, 0, 0, 0]).double(), 0.1, 0.04), base)


def test_centering_with_the_batch_mean_removes_a_dimension_that_dominates_every_image():
    gen = torch.Generator().manual_seed(2)
    t = torch.randn(64, 8, generator=gen, dtype=torch.float64) * 0.05
    t[:, 3] += 1.0  # every image's teacher prefers output 3
    raw = torch.softmax(t / 0.04, 1).mean(0)
    centered = torch.softmax((t - t.mean(0)) / 0.04, 1).mean(0)
    assert raw[3] > 0.99  # without the center, collapse onto one dimension
    assert centered[3] < 0.5 and centered.min() > 0.02  # with it, the mass is spread over the outputs


# ----------------------------------------------------------------------------------------------------------
# 3. Sharpening: the teacher tends to one-hot as its temperature tends to 0
# ----------------------------------------------------------------------------------------------------------


def test_the_softmax_of_the_largest_logit_tends_to_one_as_the_temperature_tends_to_zero():
    d, e, T = sp.symbols("d e T", positive=True)  # logits x, x - d, x - e: the first is the largest
    top = _softmax([0, -d, -e], T)[0]
    assert sp.limit(top, T, 0, "+") == 1
    assert sp.limit(_softmax([0, -d, -e], T)[1], T, 0, "+") == 0
    # and to the uniform 1/K as the temperature grows
    assert sp.limit(top, T, sp.oo) == sp.Rational(1, 3)


@pytest.mark.parametrize("temperature", [1e-2, 1e-3])
def test_a_cold_teacher_is_one_hot_and_its_cross_entropy_is_then_all_kl(temperature):
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    one_hot = torch.nn.functional.one_hot(t.argmax(1), 6).double()
    t = t + 0.5 * one_hot  # every row's largest logit leads the next by at least 0.5
    p_t = torch.softmax(t / temperature, 1)
    top2 = t.topk(2, 1).values
    gap = (top2[:, 0] - top2[:, 1]).min().item()
    # each other output has at most exp(-gap / T) of the mass, so the top one misses at most 5 times that
    assert gap >= 0.5 and (p_t - one_hot).abs().max() <= 5 * math.exp(-gap / temperature) + 1e-12
    entropy = torch.special.entr(p_t).sum(1).mean().item()
    s = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    loss = dino_loss(s, t, torch.zeros(6).double(), 0.1, temperature).item()
    kl = loss - entropy
    assert entropy < 1e-2 and kl == pytest.approx(loss, abs=1e-2)
    # a student that puts its mass on the teacher's choice drives the KL, and the loss, to 0
    confident = 50.0 * one_hot
    assert dino_loss(confident, t, torch.zeros(6).double(), 0.1, temperature).item() < 1e-2


def test_a_uniform_teacher_has_the_largest_entropy_log_k():
    uniform = torch.full((1, 1024), 1 / 1024, dtype=torch.float64)
    assert torch.special.entr(uniform).sum().item() == pytest.approx(math.log(1024), rel=1e-12)
    other = torch.softmax(torch.randn(1, 1024, generator=torch.Generator().manual_seed(4)).double(), 1)
    assert torch.special.entr(other).sum().item() < math.log(1024)


# ----------------------------------------------------------------------------------------------------------
# 4. The center is an exponential moving average of the teacher's batch means
# ----------------------------------------------------------------------------------------------------------


def test_with_a_constant_batch_mean_the_center_after_n_steps_is_m_to_the_n_c0_plus_1_minus_m_to_the_n_mu():
    m, c0, mu, n = sp.symbols("m c0 mu n", positive=True)
    closed = m**n * c0 + (1 - m**n) * mu
    step = m * closed + (1 - m) * mu  # one more update c <- m c + (1 - m) mu
    assert sp.simplify(step - closed.subs(n, n + 1)) == 0 and sp.simplify(closed.subs(n, 0) - c0) == 0
    # numerically, with the package's update: the center forgets c0 at rate m = 0.9
    c = torch.full((1, 3), 2.0, dtype=torch.float64)
    batch = torch.tensor([[0.0, 1.0, -1.0], [2.0, 1.0, 1.0]], dtype=torch.float64)  # mean (1, 1, 0)
    for _ in range(20):
        c = update_center(c, batch, 0.9)
    expected = 0.9**20 * 2.0 + (1 - 0.9**20) * torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(c, expected, rtol=0, atol=1e-12)
