"""The DINO chapter's statements: cross-entropy = entropy + KL, softmax's invariance to a shared shift
(so the center acts per output dimension), the one-hot limit of sharpening, and the center's running mean."""

import math

import pytest
import sympy as sp
import torch

from contrastive.losses import dino_loss
from contrastive.methods import build_method
from contrastive.methods.dino import update_center
from contrastive.methods.momentum import cosine_momentum

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


def test_the_other_momentum_convention_misses_the_closed_form_of_the_center():
    # c <- (1 - m) c + m mu lets m weigh the new batch: after 5 steps it is no longer m^n c0 + (1 - m^n) mu
    m, c0, mu, n = sp.symbols("m c0 mu n", positive=True)
    swapped = (1 - m) ** n * c0 + (1 - (1 - m) ** n) * mu
    assert sp.simplify(m * swapped + (1 - m) * mu - swapped.subs(n, n + 1)) != 0
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(1, 4, generator=gen, dtype=torch.float64)
    batch = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    target = 0.9**5 * start + (1 - 0.9**5) * batch.mean(0, keepdim=True)
    package, other = start, start
    for _ in range(5):
        package = update_center(package, batch, 0.9)
        other = (1 - 0.9) * other + 0.9 * batch.mean(0, keepdim=True)
    assert torch.allclose(package, target, rtol=0, atol=1e-12)
    assert not torch.allclose(other, target, rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# 5. The package's objective pinned: dino_loss and DINO.loss against independent formulas, value and gradient
# ----------------------------------------------------------------------------------------------------------


def _dino_by_loops(s, t, c, tau_s, tau_t):
    """-sum_k P_t[k] log P_s[k] averaged over the images, one image and one output at a time."""
    total = 0.0
    for s_i, t_i in zip(s, t):
        z_t = sum(math.exp((t_ik - c_k) / tau_t) for t_ik, c_k in zip(t_i, c))
        log_z_s = math.log(sum(math.exp(s_ik / tau_s) for s_ik in s_i))
        for s_ik, t_ik, c_k in zip(s_i, t_i, c):
            total -= math.exp((t_ik - c_k) / tau_t) / z_t * (s_ik / tau_s - log_z_s)
    return total / len(s)


def _logits(seed, n=6, k=9):
    gen = torch.Generator().manual_seed(seed)
    s = 0.1 * torch.randn(n, k, generator=gen, dtype=torch.float64)
    t = 0.1 * torch.randn(n, k, generator=gen, dtype=torch.float64)  # cosine-sized: P_t is not one-hot
    c = 0.05 * torch.randn(k, generator=gen, dtype=torch.float64)
    return s, t, c


def test_the_decomposition_holds_for_a_teacher_whose_entropy_is_not_zero_and_wrong_splits_fail():
    s, t, c = _logits(6)
    p_t, log_p_s = torch.softmax((t - c) / 0.04, 1), torch.log_softmax(s / 0.1, 1)
    h_t = -(p_t * p_t.log()).sum(1).mean()
    h_s = -(log_p_s.exp() * log_p_s).sum(1).mean()
    kl_ts = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    kl_st = (log_p_s.exp() * (log_p_s - p_t.log())).sum(1).mean()
    loss = dino_loss(s, t, c, 0.1, 0.04)
    assert h_t > 0.5 and torch.allclose(loss, h_t + kl_ts, rtol=0, atol=1e-10)
    for wrong in (h_t + kl_st, h_s + kl_ts):  # the KL the other way; the student's entropy
        assert not torch.allclose(loss, wrong, rtol=0, atol=1e-3)


def test_dino_loss_value_and_gradient_match_the_loops_and_p_s_minus_p_t_over_n_tau_s():
    s, t, c = _logits(7)
    student = s.clone().requires_grad_(True)
    loss = dino_loss(student, t, c, 0.1, 0.04)
    (grad,) = torch.autograd.grad(loss, student)
    p_t = torch.softmax((t - c) / 0.04, 1)
    value = _dino_by_loops(s.tolist(), t.tolist(), c.tolist(), 0.1, 0.04)
    closed = (torch.softmax(s / 0.1, 1) - p_t) / (0.1 * len(s))

    def pinned(v, g):
        return abs(loss.item() - v) < 1e-9 and torch.allclose(grad, g, rtol=0, atol=1e-9)

    def over_the_batch(x):  # the other axis: each output normalised over the images
        return -(torch.softmax((t - c) / 0.04, 0) * torch.log_softmax(x / 0.1, 0)).sum(1).mean()

    other = s.clone().requires_grad_(True)
    assert pinned(value, closed)
    no_center = (
        _dino_by_loops(s.tolist(), t.tolist(), [0.0] * 9, 0.1, 0.04),
        (torch.softmax(s / 0.1, 1) - torch.softmax(t / 0.04, 1)) / (0.1 * len(s)),
    )
    other_axis = (over_the_batch(s).item(), torch.autograd.grad(over_the_batch(other), other)[0])
    no_tau_s = (value, closed * 0.1)
    flipped = (value, -closed)
    for wrong in (no_center, other_axis, no_tau_s, flipped):
        assert not pinned(*wrong)


def _probe_dino(k=5, seed=8):
    """DINO whose student is the identity and whose teacher is a fixed linear map: a crop is its logits."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_method("dino", "convnet_tiny", 0, out_dim=k)
    model.encoder, model.head = torch.nn.Identity(), torch.nn.Identity()
    model.teacher = torch.nn.Linear(k, k, bias=False).double()
    model.center = 0.1 * torch.randn(1, k, generator=gen, dtype=torch.float64)
    crops = [torch.randn(3, k, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(6)]
    return model, crops


def test_dino_method_loss_averages_the_ten_pairs_of_its_own_list_value_and_gradient():
    model, crops = _probe_dino()
    value = model.loss(crops[:2], crops[2:])
    grads = torch.autograd.grad(value, crops)

    def averaged(pairs, center, detach=True):
        def teacher(i):
            out = model.teacher(crops[i])
            return out.detach() if detach else out

        terms = [
            -(torch.softmax((teacher(i) - center) / 0.04, 1) * torch.log_softmax(crops[j] / 0.1, 1))
            .sum(1)
            .mean()
            for i, j in pairs
        ]
        return sum(terms) / len(pairs)

    def pinned(candidate):
        other = torch.autograd.grad(candidate, crops, allow_unused=True, materialize_grads=True)
        return abs(candidate.item() - value.item()) < 1e-12 and all(
            torch.allclose(g, h, rtol=0, atol=1e-12) for g, h in zip(grads, other)
        )

    ten = [(i, j) for i in range(2) for j in range(6) if j != i]
    assert pinned(averaged(ten, model.center))
    # closed form: crop j gets the sum over its teachers i != j of (P_s(j) - P_t(i)) / (10 N tau_s)
    p_t = [torch.softmax((model.teacher(crops[i]).detach() - model.center) / 0.04, 1) for i in range(2)]
    for j, g in enumerate(grads):
        teachers = [i for i in range(2) if i != j]
        p_s = torch.softmax(crops[j].detach() / 0.1, 1)
        expected = sum(p_s - p_t[i] for i in teachers) / (0.1 * 3 * len(ten))
        assert torch.allclose(g, expected, rtol=0, atol=1e-12)
    wrong = [
        averaged([(i, j) for i in range(2) for j in range(6)], model.center),  # own crop as target too
        averaged([(i, j) for i in range(6) for j in range(6) if j != i], model.center),  # teacher on locals
        averaged(ten, torch.zeros(1, 5, dtype=torch.float64)),  # no centering
        averaged(ten, model.center, detach=False),  # no stop-gradient on the teacher
    ]
    for candidate in wrong:
        assert not pinned(candidate)


def test_dino_monitors_are_the_teachers_entropy_the_kl_and_the_entropy_of_the_mean():
    model, crops = _probe_dino(seed=9)
    model.loss(crops[:2], crops[2:])
    logged = {name: values[-1].item() for name, values in model._logged.items()}
    with torch.no_grad():
        teacher = model.teacher(torch.cat(crops[:2]))
        p_t = torch.softmax((teacher - model.center) / 0.04, 1)
        entropy = -(p_t * p_t.log()).sum(1).mean().item()
        marginal = p_t.mean(0)
        marginal_entropy = -(marginal * marginal.log()).sum().item()
        pairs = [(i, j) for i in range(2) for j in range(6) if j != i]
        kl = sum(
            (p_t.chunk(2)[i] * (p_t.chunk(2)[i].log() - torch.log_softmax(crops[j] / 0.1, 1))).sum(1).mean()
            for i, j in pairs
        ).item() / len(pairs)
    assert logged["teacher_entropy"] == pytest.approx(entropy, abs=1e-5)
    assert logged["teacher_marginal_entropy"] == pytest.approx(marginal_entropy, abs=1e-5)
    assert logged["teacher_student_kl"] == pytest.approx(kl, abs=1e-5) and kl > 0
    # the monitors are not interchangeable: the mean entropy is not the entropy of the mean
    assert abs(marginal_entropy - entropy) > 1e-2


def test_the_teacher_is_the_unrolled_average_of_the_students_and_the_other_convention_is_not():
    torch.manual_seed(10)
    model = build_method("dino", "convnet_tiny", 0, out_dim=8)
    student_params = [*model.encoder.parameters(), *model.head.parameters()]
    xi_0 = [q.detach().clone() for q in model.teacher.parameters()]
    students, momenta, steps = [], [], 5
    for step in range(steps):
        with torch.no_grad():
            for q in student_params:
                q.add_(torch.randn_like(q))
        students.append([q.detach().clone() for q in student_params])
        momenta.append(cosine_momentum(step, steps, model.tau_base))
        model.on_step_end(step, steps)

    def weights(ms):
        return [math.prod(ms)] + [(1 - m_k) * math.prod(ms[k + 1 :]) for k, m_k in enumerate(ms)]

    def matches(ms):
        w = weights(ms)
        expected = [
            w[0] * x0 + sum(w[k + 1] * theta[i] for k, theta in enumerate(students))
            for i, x0 in enumerate(xi_0)
        ]
        return all(
            torch.allclose(q, e, rtol=0, atol=1e-5) for q, e in zip(model.teacher.parameters(), expected)
        )

    assert sum(weights(momenta)) == pytest.approx(1.0, abs=1e-12) and matches(momenta)
    assert not matches([1 - m_k for m_k in momenta])


def test_a_tie_for_the_largest_logit_breaks_the_one_hot_limit():
    e, T = sp.symbols("e T", positive=True)
    assert sp.limit(_softmax([0, 0, -e], T)[0], T, 0, "+") == sp.Rational(1, 2)
